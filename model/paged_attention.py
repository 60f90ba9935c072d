"""The paged KV cache and the `torch` attention backend over it.

K and V are kept per layer as [num_blocks, block_size, num_kv_heads, head_dim] (the layout
flash-attn's block-table API reads). A sequence's tokens live in the blocks of its block table;
token i of a sequence sits in block block_table[i // block_size], row i % block_size.

The torch backend is the reference and the CPU path: it gathers each sequence's blocks into a
padded [B, S] view and runs one SDPA call for the whole batch. The triton backend (CUDA's
default) reads the blocks in place with our kernels; flash_attn hands them to flash-attn's
varlen kernel (the [gpu] extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from kernels.paged_attention import NewTokens, paged_attention
from kernels.rotary import rotary_and_write_kv_
from model.rotary import rotate_qk
from model.transfer import to_device


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):  # fmt: skip
        # NOTE: one block more than the pool hands out: the scratch block, where the padding rows
        # of a CUDA-graph decode batch write their K/V and which only they read.
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class PagedAttentionMetadata:
    """Where this step's tokens go and what each of them may see. Shared by all layers."""

    slot_mapping: torch.Tensor  # [T] int64: block * block_size + row for each new token
    query_lens: list[int]  # [B] new tokens per sequence, in batch order
    seq_lens: list[int]  # [B] tokens in the cache per sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0


class TritonPagedAttention:
    """GPU backend: one launch rotates q and k and writes K/V into their slots, then one reads
    the blocks through the block table (kernels/paged_attention.py); a small decode batch does
    both in one launch. Nothing is gathered or padded."""

    def __init__(self, cache: PagedKVCache, pdl: bool = False):
        self.cache = cache
        self.pdl = pdl  # launch the kernels as programmatic dependent launches (kernels/pdl.py)

    def prepare(self, meta: PagedAttentionMetadata) -> None:
        device = meta.slot_mapping.device
        starts = list(accumulate(meta.query_lens, initial=0))
        self.bind(
            slot_mapping=meta.slot_mapping,
            block_tables=meta.block_tables.to(torch.int32),
            seq_lens=to_device(meta.seq_lens, device, torch.int32),
            query_start_loc=to_device(starts, device, torch.int32),
            max_query_len=max(meta.query_lens),
        )

    def bind(
        self,
        slot_mapping: torch.Tensor,  # [T] int64
        block_tables: torch.Tensor,  # [B, max_blocks] int32
        seq_lens: torch.Tensor,  # [B] int32
        query_start_loc: torch.Tensor,  # [B + 1] int32
        max_query_len: int,
    ) -> None:
        """What every layer's attend() reads. prepare() binds fresh tensors each step; decode
        graphs bind their static buffers once and refill them in place before each replay."""
        self.slot_mapping, self.block_tables, self.seq_lens = slot_mapping, block_tables, seq_lens
        self.query_start_loc, self.max_query_len = query_start_loc, max_query_len

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        new = NewTokens(k, v, *cos_sin, self.slot_mapping)  # small decode batches: rotary inside the attention launch
        return paged_attention(q, k_cache, v_cache, self.block_tables, self.seq_lens,
                               self.query_start_loc, self.max_query_len, pdl=self.pdl, new=new)  # fmt: skip


class FlashAttnPagedAttention:
    """flash-attn's varlen kernel over the paged cache: our fused kernel rotates q and k and
    writes K/V into their slots, then one flash_attn_varlen_func call per layer reads each
    sequence's blocks through the block table (causal, aligned to the bottom right: a chunk's
    queries are the sequence's newest tokens, as in our kernel).

    Upstream flash-attn 2 reads a paged cache only in pages of a multiple of 256 tokens (its
    flash_api.cpp checks it; vLLM's 16-token pages use vLLM's own fork), so this backend needs
    --block-size 256: prefix caching then shares prompts in steps of 256 tokens, not 16."""

    PAGE_MULTIPLE = 256

    def __init__(self, cache: PagedKVCache, varlen_func):
        if cache.block_size % self.PAGE_MULTIPLE:
            raise ValueError(f"attention backend flash_attn reads the KV cache in pages of a multiple of "
                             f"{self.PAGE_MULTIPLE} tokens (upstream flash-attn 2): use --block-size 256, "
                             f"got {cache.block_size}")  # fmt: skip
        self.cache = cache
        self.varlen_func = varlen_func  # flash_attn.flash_attn_varlen_func

    def prepare(self, meta: PagedAttentionMetadata) -> None:
        device = meta.slot_mapping.device
        self.slot_mapping = meta.slot_mapping
        self.block_tables = meta.block_tables.to(torch.int32)
        self.cu_seqlens_q = to_device(list(accumulate(meta.query_lens, initial=0)), device, torch.int32)
        self.cu_seqlens_k = to_device(list(accumulate(meta.seq_lens, initial=0)), device, torch.int32)
        self.max_seqlen_q, self.max_seqlen_k = max(meta.query_lens), max(meta.seq_lens)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        rotary_and_write_kv_(q, k, v, *cos_sin, k_cache, v_cache, self.slot_mapping)
        out = self.varlen_func(q, k_cache, v_cache, self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q,
                               self.max_seqlen_k, causal=True, block_table=self.block_tables)  # fmt: skip
        return out.reshape(q.shape[0], -1)  # [T, H * D]


def make_attention_backend(name: str, cache: PagedKVCache, device: torch.device, pdl: bool = False):
    """'auto': the Triton kernels on CUDA, the torch reference on CPU. pdl: the Triton backend's
    kernels launch as programmatic dependent launches (kernels/pdl.py)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchPagedAttention(cache)
    if name == "triton":
        return TritonPagedAttention(cache, pdl)
    if name == "flash_attn":
        if device.type != "cuda":
            raise ValueError(f"attention backend flash_attn runs on CUDA only, the model is on {device.type}")
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError as err:
            raise ValueError("attention backend flash_attn needs the flash-attn package: pip install '.[gpu]'") from err
        return FlashAttnPagedAttention(cache, flash_attn_varlen_func)
    raise ValueError(f"attention backend must be auto, torch, triton or flash_attn, got {name!r}")


class TorchPagedAttention:
    """Reference backend: write new K/V into the blocks, gather, one masked SDPA over the batch."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.meta: PagedAttentionMetadata | None = None

    def prepare(self, meta: PagedAttentionMetadata) -> None:
        """Once per step, for every layer: where each sequence's keys are, and the additive mask."""
        self.meta = meta
        device, block_size = meta.slot_mapping.device, self.cache.block_size
        num_seqs, max_q, max_s = len(meta.query_lens), max(meta.query_lens), max(meta.seq_lens)
        self.shape = (num_seqs, max_q, max_s)
        keys = torch.arange(max_s, device=device)
        # [B, S]: row of the flattened cache that holds key s of sequence b
        self.key_rows = (meta.block_tables[:, keys // block_size] * block_size + keys % block_size).flatten()
        s_lens = to_device(meta.seq_lens, device, torch.long)
        if max_q == 1:  # decode-only step: no query padding, keys below seq_len
            mask = (keys[None, :] < s_lens[:, None])[:, None, None]  # [B, 1, 1, S]
            self.query_index = None
        else:
            q_lens = to_device(meta.query_lens, device, torch.long)
            rows = torch.arange(max_q, device=device)
            valid = rows[None, :] < q_lens[:, None]  # [B, Q]
            self.query_index = valid.flatten().nonzero().flatten()  # flat [T] -> padded [B * Q]
            query_pos = (s_lens - q_lens)[:, None] + rows[None, :]  # absolute position of each query
            mask = keys[None, None, :] <= query_pos[:, :, None]  # [B, Q, S], causal; implies key < seq_len
            mask[:, :, 0] |= ~valid  # padded queries see one key, so their (discarded) rows are not NaN
            mask = mask[:, None]  # [B, 1, Q, S]
        dtype = self.cache.k[0].dtype
        self.bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin) -> torch.Tensor:
        q, k = rotate_qk(q, k, cos_sin)
        num_seqs, max_q, max_s = self.shape
        num_kv, head_dim = k.shape[1], k.shape[2]
        k_flat = self.cache.k[layer_idx].view(-1, num_kv, head_dim)  # [blocks * block_size, KV, D]
        v_flat = self.cache.v[layer_idx].view(-1, num_kv, head_dim)
        k_flat.index_copy_(0, self.meta.slot_mapping, k)
        v_flat.index_copy_(0, self.meta.slot_mapping, v)
        # index_select over the flat rows: ~2x faster than advanced indexing on CPU
        keys = k_flat.index_select(0, self.key_rows).view(num_seqs, max_s, num_kv, head_dim).transpose(1, 2)
        values = v_flat.index_select(0, self.key_rows).view(num_seqs, max_s, num_kv, head_dim).transpose(1, 2)
        num_heads = q.shape[1]
        q_pad = q
        if self.query_index is not None:
            q_pad = q.new_zeros(num_seqs * max_q, num_heads, head_dim)
            q_pad[self.query_index] = q
        q_pad = q_pad.reshape(num_seqs, max_q, num_heads, head_dim).transpose(1, 2)  # [B, H, Q, D]
        # enable_gqa: query head h reads kv head h // (H / KV), as expand_kv_heads does
        out = F.scaled_dot_product_attention(q_pad, keys, values, attn_mask=self.bias, enable_gqa=num_kv != num_heads)
        out = out.transpose(1, 2).reshape(num_seqs * max_q, num_heads * head_dim)  # [B * Q, H * D]
        return out if self.query_index is None else out[self.query_index]  # [T, H * D]
