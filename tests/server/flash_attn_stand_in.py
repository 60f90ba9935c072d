"""A torch stand-in for flash-attn 2.8's `flash_attn_varlen_func` over a paged cache, so CPU tests
check how our flash_attn backend calls it. It asserts what the library checks (flash_api.cpp:
int32 block table and cumulative lengths, contiguous last dims, pages of a multiple of 256
tokens, query heads a multiple of the kv heads) and what its docstring promises (causal aligned
to the bottom right), and computes the result with the torch reference over the same blocks."""

from __future__ import annotations

import torch

from kernels.paged_attention import paged_attention_ref

calls = []  # (max_seqlen_q, max_seqlen_k) of each call, for the tests
query_lens = []  # each call's query rows a sequence


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):  # fmt: skip
    assert block_table is not None and block_table.dtype == torch.int32 and block_table.stride(-1) == 1
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and k.shape == v.shape
    num_blocks, page, num_kv_heads, head_dim = k.shape
    assert page % 256 == 0 and q.shape[1] % num_kv_heads == 0 and q.shape[2] == head_dim
    assert causal and softmax_scale is None and dropout_p == 0.0  # CogVLM: causal, 1/sqrt(head_dim)
    assert cu_seqlens_q[-1] == q.shape[0] and cu_seqlens_q.shape == cu_seqlens_k.shape
    seq_lens = cu_seqlens_k.diff()
    assert int((cu_seqlens_q.diff()).max()) == max_seqlen_q and int(seq_lens.max()) == max_seqlen_k
    calls.append((max_seqlen_q, max_seqlen_k))
    query_lens.append(cu_seqlens_q.diff().tolist())
    # bottom-right causal: query i of a sequence's q_len sees keys up to seq_len - q_len + i,
    # which is how paged_attention_ref places a sequence's queries
    out = paged_attention_ref(q, k, v, block_table, seq_lens, cu_seqlens_q)  # [T, H * D]
    return out.view(q.shape)
