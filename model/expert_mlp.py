from __future__ import annotations

import torch
from torch import nn

from kernels.expert_routing import ExpertRouting
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
        self.language_gate_up: torch.Tensor | None = None  # [2I, hidden], see fuse_language_gate_up

    @torch.no_grad()
    def fuse_language_gate_up(self) -> None:
        """Put the language expert's gate and up weights in one [2I, hidden] tensor, so the dense
        path (every decode step) runs one GEMM instead of two. The two parameters become views of
        it: their names, values and the memory they take are unchanged. Inference only: call it
        after the model is on its device (a later .to() would copy the views apart)."""
        if self.language_gate_up is not None:
            return
        gate, up = self.language_mlp.gate_proj, self.language_mlp.up_proj
        fused = torch.cat([gate.weight, up.weight])
        inter = gate.weight.shape[0]
        gate.weight = nn.Parameter(fused[:inter], requires_grad=False)
        up.weight = nn.Parameter(fused[inter:], requires_grad=False)
        self.language_gate_up = fused

    def forward(self, x: torch.Tensor, routing: ExpertRouting | None) -> torch.Tensor:
        return routed_gated_mlp(x, routing, self.language_mlp, self.vision_mlp, self.language_gate_up)
