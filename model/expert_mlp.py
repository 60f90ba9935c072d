from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.expert_linear import expert_linear


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); one per expert."""

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

    def forward(self, x: torch.Tensor, vision_mask: torch.Tensor | None) -> torch.Tensor:
        lang, vis = self.language_mlp, self.vision_mlp
        gate = expert_linear(x, vision_mask, lang.gate_proj.weight, vis.gate_proj.weight)  # [T, I]
        up = expert_linear(x, vision_mask, lang.up_proj.weight, vis.up_proj.weight)  # [T, I]
        return expert_linear(F.silu(gate) * up, vision_mask, lang.down_proj.weight, vis.down_proj.weight)
