"""Neox-style rotary embeddings (rotate_half on the two halves of each head)."""

from __future__ import annotations

import torch

from kernels.rotary import rotary_embedding_
from model.dispatch import use_triton


def rotary_cos_sin(
    position_ids: torch.Tensor,  # [T] int
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # 2 x [T, 1, head_dim]
    """Angles in fp32, then cos/sin cast to the model dtype, as the reference's cached tables are."""
    device = position_ids.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # [T, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_table(
    length: int, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:  # [length, 2, head_dim]: cos, then sin, of positions 0 .. length - 1
    """Every position's cos and sin once, each element computed as rotary_cos_sin computes it (the
    reference model caches such a table too). Why: rotary_cos_sin is 10 small kernels a forward
    (arange, pow, reciprocal, the product, cat, cos, sin, two casts) on the critical path of a
    decode step: 0.013 ms of GPU time in a CogVLM-17B batch-1 step on an H200, where one gather
    from this table takes 0.004 (RESULTS.md, twelfth session; the step moved within its noise)."""
    cos, sin = rotary_cos_sin(torch.arange(length, device=device), head_dim, theta, dtype)
    return torch.cat((cos, sin), dim=1)


def cos_sin_at(
    table: torch.Tensor,  # [P, 2, D], rotary_table's
    position_ids: torch.Tensor,  # [T] int, each below P
) -> tuple[torch.Tensor, torch.Tensor]:  # 2 x [T, 1, D]: views of one gathered [T, 2, D] (the same strides)
    rows = table[position_ids]
    return rows[:, :1], rows[:, 1:]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; the rotation itself runs in fp32."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos.float() + rotated * sin.float()).to(x.dtype)


def rotate_qk(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KV, D]
    cos_sin: tuple[torch.Tensor, torch.Tensor],  # 2 x [T, 1, D]
) -> tuple[torch.Tensor, torch.Tensor]:  # q and k rotated: in place with the Triton kernel, new tensors in eager
    if use_triton(q):
        rotary_embedding_(q, k, *cos_sin)  # one launch instead of ~16
        return q, k
    return apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
