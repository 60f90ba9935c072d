"""Attention backends: what a decoder layer calls once it has q, k, v for its tokens.

A backend owns the KV cache and the causal structure of the batch; the layer only knows its
index. The backend applies rotary itself, so the paged GPU backends rotate K on its way into the
cache (one launch for both). The contiguous cache here is the one-sequence reference (the
numerics oracle); the paged backends of the engine implement the same `attend`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from model.rotary import rotate_qk


class AttentionBackend(Protocol):
    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,  # [T, num_heads, head_dim], before rotary (may be rotated in place)
        k: torch.Tensor,  # [T, num_kv_heads, head_dim], before rotary (same)
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # 2 x [T, 1, head_dim]: each token's rotary angles
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        ...


def expand_kv_heads(kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[S, num_kv_heads, D] -> [S, num_heads, D]: query head h reads kv head h // group."""
    group = num_heads // kv.shape[1]
    return kv if group == 1 else kv.repeat_interleave(group, dim=1)


def causal_attention(
    q: torch.Tensor,  # [T, H, D]: the last T of the S positions
    k: torch.Tensor,  # [S, KV, D]
    v: torch.Tensor,  # [S, KV, D]
) -> torch.Tensor:  # [T, H * D]
    num_tokens, num_heads, head_dim = q.shape
    num_keys = k.shape[0]
    k = expand_kv_heads(k, num_heads).transpose(0, 1)  # [H, S, D]
    v = expand_kv_heads(v, num_heads).transpose(0, 1)
    mask = None
    if num_tokens > 1:
        # query t sits at absolute position num_keys - num_tokens + t and sees keys up to it
        offset = num_keys - num_tokens
        rows = torch.arange(num_tokens, device=q.device)[:, None] + offset
        mask = torch.arange(num_keys, device=q.device)[None, :] <= rows  # [T, S]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask)  # [H, T, D]
    return out.transpose(0, 1).reshape(num_tokens, num_heads * head_dim)


class ContiguousKVCache:
    """One sequence, K and V as [layers, max_len, kv_heads, head_dim]. Obviously right, not fast."""

    def __init__(self, num_layers: int, max_len: int, num_kv_heads: int, head_dim: int, dtype, device):
        shape = (num_layers, max_len, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.num_cached_tokens = 0  # tokens whose K/V are final; the forward in flight writes after them
        self.max_len = max_len

    def attend(self, layer_idx: int, q, k, v, cos_sin) -> torch.Tensor:
        q, k = rotate_qk(q, k, cos_sin)
        start, end = self.num_cached_tokens, self.num_cached_tokens + q.shape[0]
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache of {self.max_len}")
        self.k[layer_idx, start:end] = k
        self.v[layer_idx, start:end] = v
        return causal_attention(q, self.k[layer_idx, :end], self.v[layer_idx, :end])

    def advance(self, num_tokens: int) -> None:
        """Called once per forward, after every layer has written its K/V."""
        self.num_cached_tokens += num_tokens
