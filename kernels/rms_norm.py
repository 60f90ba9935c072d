"""RMSNorm with the residual add fused in: one launch where eager torch needs eight.

Why: a decode step is launch-bound. Eager RMSNorm is float, pow, mean, add, rsqrt, mul, mul,
cast (8 kernels), plus the residual add before it; twice per layer, 32 layers: ~580 launches
of a ~1,400-launch CogVLM-17B decode step whose weights take 3.1 ms to read (H200).

Semantics are CogVLM's (COGVLM.md 4.3): the residual sum is rounded exactly as eager's add, and
the normed output agrees with `rms_norm_ref` up to the order of the fp32 sum and 1/sqrt against
torch's rsqrt (the tests hold it to the issue's bound: at most 2x torch's own error):
    residual' = (x + residual) rounded to x's dtype     (the eager `hidden + sublayer(...)`)
    out       = (weight * (r32 * rsqrt(mean(r32^2) + eps))) rounded, with r32 = residual' in fp32
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    hidden, stride_x, stride_r, stride_o, stride_ro, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=valid, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like the eager add
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=valid)
    x32 = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * (x32 * inv_rms)).to(out_ptr.dtype.element_ty), mask=valid)


def rms_norm(
    x: torch.Tensor,  # [T, hidden], last dim contiguous
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, hidden]: added to x first
) -> tuple[torch.Tensor, torch.Tensor | None]:  # normed [T, hidden]; x + residual (None without one)
    if x.dim() != 2 or x.stride(-1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm takes x [T, hidden] with a contiguous last dim and weight [hidden], "
                         f"got {tuple(x.shape)} (strides {x.stride()}) and {tuple(weight.shape)}")  # fmt: skip
    num_tokens, hidden = x.shape
    out = torch.empty_like(x)
    residual_out = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1:
            raise ValueError("residual must match x in shape and dtype, with a contiguous last dim")
        residual_out = torch.empty_like(x)
    if num_tokens == 0:
        return out, residual_out
    r, ro = (residual, residual_out) if residual is not None else (x, out)  # unused when HAS_RESIDUAL is off
    _rms_norm_kernel[(num_tokens,)](
        x, r, weight, out, ro, hidden, x.stride(0), r.stride(0), out.stride(0), ro.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
        num_warps=4 if hidden <= 2048 else 8,
    )  # fmt: skip
    return out, residual_out


def rms_norm_ref(x, weight, eps, residual=None):
    """The eager composition the model used before the kernel, op for op."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed).to(x.dtype), (x if residual is not None else None)
