"""silu(gate) * up in one launch (eager torch: silu, then mul, two passes over [T, I]).

Rounded where eager bf16 rounds: silu's result to the input dtype first, then the product, so
the dense decode path gives what `F.silu(gate) * up` gives. gate and up may be the two column
halves of one [T, 2I] GEMM output (the fused language gate_up weight): rows are strided.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # columns per program


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, width, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < width
    g = tl.load(gate_ptr + row * stride_g + cols, mask=valid, other=0.0)
    u = tl.load(up_ptr + row * stride_u + cols, mask=valid, other=0.0)
    g32 = g.to(tl.float32)
    silu = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
    tl.store(out_ptr + row * stride_o + cols, (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=valid)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # [T, I] x2 -> [T, I]
    if gate.dim() != 2 or gate.shape != up.shape or gate.dtype != up.dtype or gate.stride(-1) != 1 \
            or up.stride(-1) != 1:  # fmt: skip
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must be matching 2-D tensors with "
                         f"contiguous rows")  # fmt: skip
    num_rows, width = gate.shape
    out = torch.empty(num_rows, width, dtype=gate.dtype, device=gate.device)
    if out.numel():
        _silu_and_mul_kernel[(num_rows, triton.cdiv(width, BLOCK))](
            gate, up, out, width, gate.stride(0), up.stride(0), out.stride(0), BLOCK=BLOCK
        )
    return out
