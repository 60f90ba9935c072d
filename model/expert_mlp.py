from __future__ import annotations

import torch
from torch import nn

from kernels.expert_linear import ExpertRouting
from model.experts import routed_gated_mlp


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); one per expert. Holds the weights; experts.py runs them."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class VisionExpertMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.language_mlp = GatedMLP(hidden_size, intermediate_size)
        self.vision_mlp = GatedMLP(hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor, routing: ExpertRouting | None) -> torch.Tensor:
        return routed_gated_mlp(x, routing, self.language_mlp, self.vision_mlp)
