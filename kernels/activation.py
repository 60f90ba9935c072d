"""silu(gate) * up in one launch (eager torch: silu, then mul, two passes over [T, I]).

Rounded where eager bf16 rounds: silu's result to the input dtype first, then the product, so
the dense decode path gives what `F.silu(gate) * up` gives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per program; [T, I] is flat, contiguous


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel
    g = tl.load(gate_ptr + offs, mask=valid, other=0.0)
    u = tl.load(up_ptr + offs, mask=valid, other=0.0)
    g32 = g.to(tl.float32)
    silu = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
    tl.store(out_ptr + offs, (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=valid)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # [T, I] x2 -> [T, I]
    if gate.shape != up.shape or gate.dtype != up.dtype or not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must match and be contiguous")
    out = torch.empty_like(gate)
    if gate.numel():
        _silu_and_mul_kernel[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(), BLOCK=BLOCK)
    return out
