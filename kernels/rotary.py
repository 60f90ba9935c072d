"""Rotary embeddings for q and k in one in-place launch (eager torch: ~16 kernels per layer).

Neox layout (rotate_half over the two halves of each head), the rotation in fp32 and rounded
once, exactly as `model/rotary.py`'s `apply_rotary`:
    out[:half] = x1 * cos[:half] - x2 * sin[:half]
    out[half:] = x2 * cos[half:] + x1 * sin[half:]
q and k may be strided views of the fused QKV output (rows of q + 2 kv values): rotating them
in place saves the copies, and the attention kernel reads q through its strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr,
    num_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
    HALF: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if head < num_heads:
        base = q_ptr + token * stride_qt + head * stride_qh
    else:
        base = k_ptr + token * stride_kt + (head - num_heads) * stride_kh
    dims = tl.arange(0, HALF)
    x1 = tl.load(base + dims)
    x2 = tl.load(base + HALF + dims)
    c1 = tl.load(cos_ptr + token * stride_ct + dims).to(tl.float32)
    c2 = tl.load(cos_ptr + token * stride_ct + HALF + dims).to(tl.float32)
    s1 = tl.load(sin_ptr + token * stride_ct + dims).to(tl.float32)
    s2 = tl.load(sin_ptr + token * stride_ct + HALF + dims).to(tl.float32)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base + dims, (a * c1 - b * s1).to(x1.dtype))
    tl.store(base + HALF + dims, (b * c2 + a * s2).to(x1.dtype))


def rotary_embedding_(
    q: torch.Tensor,  # [T, H, D], last dim contiguous; rotated in place
    k: torch.Tensor,  # [T, KV, D], same
    cos: torch.Tensor,  # [T, 1, D] (model dtype, as rotary_cos_sin returns it)
    sin: torch.Tensor,  # [T, 1, D]
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim & (head_dim - 1) or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need one token count and a power-of-two head_dim")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride() != sin.stride() or cos.stride(-1) != 1:
        raise ValueError("q, k, cos and sin need a contiguous last dim (cos and sin the same strides)")
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens, num_heads + num_kv_heads)](
        q, k, cos, sin, num_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        HALF=head_dim // 2, num_warps=1,
    )  # fmt: skip
