"""Which implementation runs a visual-expert projection: the one place that decides.

- no vision token in the batch (host-side knowledge, e.g. every decode step): one dense GEMM
  with the language weights;
- CUDA: the routed Triton kernels of kernels/expert_linear.py (one launch, no host sync);
- CPU: the plain-torch references (gather -> two GEMMs -> scatter).

When the model carries its rows in the routing's slot order (ExpertRouting.in_slots, the
engine's --expert-rows grouped), the routed projections take them as they are: on CUDA through
kernels/grouped_expert_linear.py, every tile one run of rows; on CPU through the same
references over the slots' own mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.activation import silu_and_mul
from kernels.expert_linear import expert_gated_up, expert_gated_up_ref, expert_linear, expert_linear_ref
from kernels.expert_routing import ExpertRouting, route_by_expert, slot_vision_mask
from kernels.grouped_expert_linear import grouped_expert_linear, grouped_gated_up
from model.dispatch import use_triton


def routing_for(vision_mask: torch.Tensor | None, in_slots: bool = False) -> ExpertRouting | None:
    """Once per forward: the same routing serves the 6 projections of every layer. in_slots: the
    layers carry their rows in its slot order (CogVLMForCausalLM.grouped_expert_rows)."""
    return None if vision_mask is None else route_by_expert(vision_mask, in_slots)


def routed_linear(
    x: torch.Tensor,  # [T, in]; [num_slots, in] when routing.in_slots
    routing: ExpertRouting | None,
    language: nn.Linear,
    vision: nn.Linear,
) -> torch.Tensor:  # [T, out]; [num_slots, out] when routing.in_slots
    if routing is None:
        return F.linear(x, language.weight, language.bias)
    weights = (language.weight, vision.weight, language.bias, vision.bias)
    if routing.in_slots:
        if use_triton(x):
            return grouped_expert_linear(x, routing, *weights)
        return expert_linear_ref(x, slot_vision_mask(routing), *weights)
    if use_triton(x):
        return expert_linear(x, routing.vision_mask, *weights, routing=routing)
    return expert_linear_ref(x, routing.vision_mask, *weights)


def routed_gated_mlp(
    x: torch.Tensor,  # [T, hidden]; [num_slots, hidden] when routing.in_slots
    routing: ExpertRouting | None,
    language: nn.Module,  # has gate_proj, up_proj, down_proj
    vision: nn.Module,
    language_gate_up: torch.Tensor | None = None,  # [2I, hidden]: language gate and up weights, fused
) -> torch.Tensor:  # [T, hidden]: down(silu(gate(x)) * up(x)) by each row's expert
    if routing is None:
        if language_gate_up is not None and use_triton(x):  # one GEMM, one epilogue kernel
            gate_up = F.linear(x, language_gate_up)  # [T, 2I]
            inter = gate_up.shape[1] // 2
            h = silu_and_mul(gate_up[:, :inter], gate_up[:, inter:])
        else:
            gate, up = F.linear(x, language.gate_proj.weight), F.linear(x, language.up_proj.weight)
            h = silu_and_mul(gate, up) if use_triton(x) else F.silu(gate) * up  # [T, inter]
        return F.linear(h, language.down_proj.weight)
    weights = (
        language.gate_proj.weight,
        language.up_proj.weight,
        vision.gate_proj.weight,
        vision.up_proj.weight,
    )
    if routing.in_slots:
        if use_triton(x):
            h = grouped_gated_up(x, routing, *weights)  # [num_slots, inter], written once
        else:
            h = expert_gated_up_ref(x, slot_vision_mask(routing), *weights)
    elif use_triton(x):
        h = expert_gated_up(x, routing.vision_mask, *weights, routing=routing)  # [T, inter], written once
    else:
        h = expert_gated_up_ref(x, routing.vision_mask, *weights)
    return routed_linear(h, routing, language.down_proj, vision.down_proj)
