"""Rotary embeddings for q and k in one in-place launch (eager torch: ~16 kernels per layer),
and, for the paged cache, the same launch writing the rotated K and the V of each token into
its cache slot (one launch where rotary + K/V write took two).

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

from kernels.pdl import pdl_launch


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    num_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
    stride_slot, stride_cache_h,
    HALF: tl.constexpr, WRITE_KV: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (token, head): heads below num_heads are q's, the rest k's (and v's)."""
    if PDL:  # everything here reads the QKV projection's output (kernels/pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dims = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + token * stride_ct + dims).to(tl.float32)
    c2 = tl.load(cos_ptr + token * stride_ct + HALF + dims).to(tl.float32)
    s1 = tl.load(sin_ptr + token * stride_ct + dims).to(tl.float32)
    s2 = tl.load(sin_ptr + token * stride_ct + HALF + dims).to(tl.float32)
    kv_head = head - num_heads
    if head < num_heads:
        src = q_ptr + token * stride_qt + head * stride_qh
        dst = src
    else:
        src = k_ptr + token * stride_kt + kv_head * stride_kh
        dst = src
        if WRITE_KV:
            slot = tl.load(slot_ptr + token)
            dst = k_cache_ptr + slot * stride_slot + kv_head * stride_cache_h
            v_src = v_ptr + token * stride_vt + kv_head * stride_vh
            v_dst = v_cache_ptr + slot * stride_slot + kv_head * stride_cache_h
            tl.store(v_dst + dims, tl.load(v_src + dims))
            tl.store(v_dst + HALF + dims, tl.load(v_src + HALF + dims))
    x1 = tl.load(src + dims)
    x2 = tl.load(src + HALF + dims)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(dst + dims, (a * c1 - b * s1).to(x1.dtype))
    tl.store(dst + HALF + dims, (b * c2 + a * s2).to(x1.dtype))


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    num_tokens, _, head_dim = q.shape
    if head_dim & (head_dim - 1) or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need one token count and a power-of-two head_dim")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride() != sin.stride() or cos.stride(-1) != 1:
        raise ValueError("q, k, cos and sin need a contiguous last dim (cos and sin the same strides)")


def check_kv_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    """rotary_and_write_kv_'s arguments (the split decode takes the same ones, kernels/paged_attention.py)."""
    _check(q, k, cos, sin)
    num_tokens, _, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if v.shape != k.shape or v.stride(-1) != 1:
        raise ValueError(f"v must be shaped like k {tuple(k.shape)} with a contiguous last dim, got {tuple(v.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape != v_cache.shape \
            or k_cache.shape[2:] != k.shape[1:] or k_cache.dtype != k.dtype:  # fmt: skip
        raise ValueError(f"k_cache and v_cache must be contiguous [num_blocks, block_size, {num_kv_heads}, "
                         f"{head_dim}] in k's dtype, got {tuple(k_cache.shape)} {k_cache.dtype}")  # fmt: skip
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must have one slot per token ({num_tokens}), got {tuple(slot_mapping.shape)}")


def rotary_embedding_(
    q: torch.Tensor,  # [T, H, D], last dim contiguous; rotated in place
    k: torch.Tensor,  # [T, KV, D], same
    cos: torch.Tensor,  # [T, 1, D] (model dtype, as rotary_cos_sin returns it)
    sin: torch.Tensor,  # [T, 1, D]
) -> None:
    _check(q, k, cos, sin)
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens:  # the v and cache arguments are unused without WRITE_KV
        _rotary_kernel[(num_tokens, num_heads + k.shape[1])](
            q, k, k, cos, sin, k, k, cos, num_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1), 0, 0,
            cos.stride(0), 0, 0, HALF=head_dim // 2, WRITE_KV=False, PDL=False, num_warps=1,
        )  # fmt: skip


def rotary_and_write_kv_(
    q: torch.Tensor,  # [T, H, D], last dim contiguous; rotated in place
    k: torch.Tensor,  # [T, KV, D]: rotated into k_cache (k itself is left as it was)
    v: torch.Tensor,  # [T, KV, D]: copied into v_cache
    cos: torch.Tensor,  # [T, 1, D]
    sin: torch.Tensor,  # [T, 1, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KV, D], contiguous
    v_cache: torch.Tensor,  # same
    slot_mapping: torch.Tensor,  # [T] int64: block * block_size + row of each token
    pdl: bool = False,  # a programmatic dependent launch (kernels/pdl.py)
) -> None:
    """Rotary on q and k, and this step's K/V into their cache slots, in one launch."""
    check_kv_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens:
        pdl, launch = pdl_launch(pdl, q.device)
        _rotary_kernel[(num_tokens, num_heads + num_kv_heads)](
            q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
            num_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            num_kv_heads * head_dim, head_dim, HALF=head_dim // 2, WRITE_KV=True, PDL=pdl, num_warps=1, **launch,
        )  # fmt: skip
