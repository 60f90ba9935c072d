"""Paged attention over a block-table KV cache, for decode and for prefill chunks over a cached prefix.

One kernel serves both: each program takes a tile of one sequence's queries for one KV head,
every query head of that head's group as rows of the same tile (GQA: CogVLM2's 4 query heads a
KV head read each K/V tile once), walks the sequence's KV blocks through its block table (only
up to the last key its queries may see) with an online softmax, and writes the context rows in
place. Queries of a sequence are its newest q_len tokens, at absolute positions
seq_len - q_len .. seq_len - 1.

A decode batch too small to fill the GPU (sequences x heads < 264 programs) instead splits each
sequence's keys over several programs and merges their partial softmaxes (flash-decoding); the
split count depends on the batch shape only, so CUDA graphs can hold it. The split that finishes
last for its (sequence, head) does the merge (kernels/arrivals.py: no waiting), so this is
one launch a layer, not two: at batch 1 the separate merge kernel took 0.061 ms of a 4.45 ms
CogVLM-17B decode step on an H200, mostly 32 launches. Only the splits that hold keys take part
(the grid is fixed, the context is not): a sequence whose keys fit one split (up to 128 of them)
writes its output directly, with no parts, count or merge. On an H200 the one-launch version
took 0.31 ms a step at ~40 tokens of context when every split still wrote a part and counted in.
Handed this step's raw K/V (NewTokens), the split decode also applies rotary to q and k and
writes K/V into the cache itself, the newest key joining the softmax from registers: one launch
a layer where rotary took its own (kernels/rotary.py; the other kernel still runs after it).

    out[t, h] = softmax(q[t, h] . K[seq(t), kv(h)]^T * scale, causal) @ V[seq(t), kv(h)]

with kv(h) = h // (num_heads / num_kv_heads) (GQA) and the cache laid out as
[num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.arrivals import arrival_counts
from kernels.pdl import pdl_launch
from kernels.rotary import check_kv_write, rotary_and_write_kv_


# fmt: off
@triton.jit
def _kv_offsets(physical, key_pos, kv_head, dims, stride_kb, stride_ks, stride_kh, BLOCK_SIZE: tl.constexpr):
    """[BN, D] element offsets of keys key_pos ([BN]) of one KV head in a paged K or V cache, whose
    blocks `physical` ([BN] int64, from the block table) hold them."""
    return (physical[:, None] * stride_kb + (key_pos % BLOCK_SIZE)[:, None] * stride_ks
            + kv_head * stride_kh + dims[None, :])  # fmt: skip


@triton.jit
def _paged_attention_kernel(
    # pointers
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    # sizes
    scale,
    # strides
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_bt,
    # constexpr
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    # fmt: on
    if PDL:  # q and this step's K/V come from the kernel before (kernels/pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    q_tile = tl.program_id(2)
    TOKENS: tl.constexpr = BLOCK_M // GROUP  # query tokens a tile; each brings its GROUP heads
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_tile * TOKENS >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # keys already cached before this step's queries

    # Rows are (query token, head of this KV head's group), token-major: the group's heads share
    # every K/V tile this program loads (4 query heads a KV head in CogVLM2).
    r = tl.arange(0, BLOCK_M)
    rows = q_tile * TOKENS + r // GROUP  # [BM] query index within the sequence
    heads = kv_head * GROUP + r % GROUP  # [BM]
    row_valid = (r < TOKENS * GROUP) & (rows < q_len)
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_valid[:, None], other=0.0)  # [BM, D]
    query_pos = context + rows  # [BM] absolute positions

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    last_key = tl.minimum(context + (q_tile + 1) * TOKENS, seq_len)  # causal: no query here sees past it
    # NOTE: BLOCK_N keys per iteration, gathered from BLOCK_N / BLOCK_SIZE blocks: a decode
    # program walks its keys serially, and 16-key steps made a 64-token context cost 11 us per
    # layer on an H200 (latency of dependent loads, not bandwidth).
    offs = tl.arange(0, BLOCK_N)
    for start in range(0, last_key, BLOCK_N):
        key_pos = start + offs  # [BN]
        key_valid = key_pos < last_key
        physical = tl.load(block_tables_ptr + seq * stride_bt + key_pos // BLOCK_SIZE, mask=key_valid,
                           other=0).to(tl.int64)  # [BN]
        kv_offs = _kv_offsets(physical, key_pos, kv_head, dims, stride_kb, stride_ks, stride_kh, BLOCK_SIZE)
        k = tl.load(k_cache_ptr + kv_offs, mask=key_valid[:, None], other=0.0)  # [BN, D]
        v = tl.load(v_cache_ptr + kv_offs, mask=key_valid[:, None], other=0.0)  # [BN, D]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BM, BN] (fp32 accumulate)
        allowed = (key_pos[None, :] <= query_pos[:, None]) & row_valid[:, None]
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


@triton.jit
def _online_softmax_step(q, k, v, valid, m_i, l_i, acc, scale):
    """One tile of keys into a running softmax: q [D], k and v [BN, D] fp32, valid [BN] (at least
    one key valid); (max, sum, unnormalised output [D]) before and after."""
    scores = tl.where(valid, tl.sum(q[None, :] * k, axis=1) * scale, float("-inf"))  # [BN]
    m_new = tl.maximum(m_i, tl.max(scores, axis=0))  # finite: the tile holds a valid key
    p = tl.exp(scores - m_new)
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
    return m_new, l_i, acc


@triton.jit
def _merge_splits(part_acc_ptr, part_ml_ptr, first_part, count, out_ptr, HEAD_DIM: tl.constexpr,
                  NUM_SPLITS: tl.constexpr):  # fmt: skip
    """Merge one (sequence, head)'s first `count` partial softmaxes, in split order, into out_ptr[:HEAD_DIM].
    Loads bypass L1 (.cg): the parts were written by programs on other SMs."""
    split = tl.arange(0, NUM_SPLITS)  # [S]
    part, used = first_part + split, split < count
    dims = tl.arange(0, HEAD_DIM)
    m = tl.load(part_ml_ptr + part * 2, mask=used, other=float("-inf"), cache_modifier=".cg")  # [S]
    l_split = tl.load(part_ml_ptr + part * 2 + 1, mask=used, other=0.0, cache_modifier=".cg")
    weight = tl.exp(m - tl.max(m, axis=0))  # [S]; 0 for unused splits; split 0 always has keys
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0,
                  cache_modifier=".cg")  # [S, D]  # fmt: skip
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l_split * weight, axis=0)
    tl.store(out_ptr + dims, out.to(out_ptr.dtype.element_ty))


# fmt: off
@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr, arrivals_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr,
    # ROTARY: this step's raw K/V rows, the rotary tables and the cache slots (kernels/rotary.py's)
    k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, slot_ptr,
    scale, num_q_heads_per_kv,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    stride_knt, stride_knh, stride_vnt, stride_vnh, stride_ct,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    ROTARY: tl.constexpr, PDL: tl.constexpr,
    EARLY_TILE: tl.constexpr,  # ROTARY: the first tile of cached keys loads before the PDL wait
):
    # fmt: on
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    # The sequence length, query row and block table come from the step's input copy, not from
    # the kernel right before (kernels/pdl.py), so under PDL they load while that kernel still
    # runs; q and this step's K/V are its output and load after the wait.
    seq_len = tl.load(seq_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N  # keys, whole tiles
    # Splits past the last key have nothing to add and leave at once: a CUDA graph fixes the grid
    # (16 splits a head at batch 1) while the context grows from a few tokens, where 15 of the 16
    # would otherwise each store an empty part and count in. They leave before the PDL wait: gone,
    # a program counts as triggered (kernels/pdl.py) and frees its slot. At 71 tokens 480 of batch
    # 1's 512 programs are such, more than the SMs hold beside the others (3 an SM at 168
    # registers), and the next kernel launches only once every program has triggered or gone. The
    # split that holds keys waits, so the next kernel still starts after the one before this ends.
    active = tl.cdiv(seq_len, per_split)  # splits holding keys, 1 to NUM_SPLITS
    if split >= active:
        return
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    offs = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    kv_head = head // num_q_heads_per_kv
    table = block_tables_ptr + seq * stride_bt
    physical = tl.load(table + (start + offs) // BLOCK_SIZE, mask=start + offs < end, other=0).to(tl.int64)  # [BN]
    q_row = tl.load(query_start_ptr + seq).to(tl.int64)
    newest = seq_len - 1  # this step's key: in the cache (written before), or ROTARY's to rotate and write
    cached_end = tl.minimum(end, newest) if ROTARY else end  # ROTARY: the newest key joins after the loop
    first_ok = start + offs < cached_end  # ROTARY: the first tile's cached keys
    first_offs = _kv_offsets(physical, start + offs, kv_head, dims, stride_kb, stride_ks, stride_kh, BLOCK_SIZE)
    if ROTARY and EARLY_TILE:
        # The keys before this step's were written by earlier steps, not by the kernel right
        # before, so under PDL the split's first tile of keys (at 71 or 1279 tokens of context, its
        # only one) streams in while that kernel drains: one memory latency off each layer's
        # chain. Its values load right after the wait, beside q: they are needed after the scores.
        k_first = tl.load(k_cache_ptr + first_offs, mask=first_ok[:, None], other=0.0)  # [BN, D]
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if ROTARY:
        if not EARLY_TILE:  # the keys after the wait too (bench_decode.py's baseline)
            k_first = tl.load(k_cache_ptr + first_offs, mask=first_ok[:, None], other=0.0)  # [BN, D]
        v_first = tl.load(v_cache_ptr + first_offs, mask=first_ok[:, None], other=0.0)  # [BN, D]
        upcoming = start + offs + BLOCK_N  # the second tile's blocks
        physical = tl.load(table + upcoming // BLOCK_SIZE, mask=upcoming < end, other=0).to(tl.int64)
    q = tl.load(q_ptr + q_row * stride_qt + head * stride_qh + dims).to(tl.float32)  # [D]
    if ROTARY:
        # kernels/rotary.py's rotation, on the whole head at once: each dim pairs with the one
        # half a head away, the first half's partner negated; rounded once to the cache dtype
        HALF: tl.constexpr = HEAD_DIM // 2
        partner = (dims + HALF) % HEAD_DIM
        cos = tl.load(cos_ptr + q_row * stride_ct + dims).to(tl.float32)
        sin = tl.load(sin_ptr + q_row * stride_ct + dims).to(tl.float32)
        sign = tl.where(dims < HALF, -1.0, 1.0)
        q_turned = tl.load(q_ptr + q_row * stride_qt + head * stride_qh + partner).to(tl.float32)
        q = (q * cos + sign * q_turned * sin).to(q_ptr.dtype.element_ty).to(tl.float32)
        k_row = k_new_ptr + q_row * stride_knt + kv_head * stride_knh
        k_own, k_turned = tl.load(k_row + dims).to(tl.float32), tl.load(k_row + partner).to(tl.float32)
        k_new = (k_own * cos + sign * k_turned * sin).to(k_cache_ptr.dtype.element_ty)  # [D]
        v_row = v_new_ptr + q_row * stride_vnt + kv_head * stride_vnh
        v_new = tl.load(v_row + dims).to(v_cache_ptr.dtype.element_ty)  # [D]
        # The program of the newest key's split and the KV head's first query head writes it;
        # no program of this launch reads that slot (the newest key joins from registers).
        if (end == seq_len) & (head % num_q_heads_per_kv == 0):
            slot = tl.load(slot_ptr + q_row)
            tl.store(k_cache_ptr + slot * stride_ks + kv_head * stride_kh + dims, k_new)
            tl.store(v_cache_ptr + slot * stride_ks + kv_head * stride_kh + dims, v_new)
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    loop_start = start
    if ROTARY:
        if start < cached_end:  # the first tile (EARLY_TILE: its keys loaded before the wait)
            m_i, l_i, acc = _online_softmax_step(q, k_first.to(tl.float32), v_first.to(tl.float32), first_ok,
                                                 m_i, l_i, acc, scale)  # fmt: skip
        loop_start = start + BLOCK_N
    for tile in range(loop_start, cached_end, BLOCK_N):
        key_pos = tile + offs  # [BN]
        valid = key_pos < cached_end
        kv_offs = _kv_offsets(physical, key_pos, kv_head, dims, stride_kb, stride_ks, stride_kh, BLOCK_SIZE)
        k = tl.load(k_cache_ptr + kv_offs, mask=valid[:, None], other=0.0).to(tl.float32)  # [BN, D]
        v = tl.load(v_cache_ptr + kv_offs, mask=valid[:, None], other=0.0).to(tl.float32)  # [BN, D]
        # the next tile's blocks load while this tile's K/V are in flight: the table lookup
        # is off the chain of dependent loads, but for the first tile
        upcoming = key_pos + BLOCK_N
        physical = tl.load(table + upcoming // BLOCK_SIZE, mask=upcoming < end, other=0).to(tl.int64)
        m_i, l_i, acc = _online_softmax_step(q, k, v, valid, m_i, l_i, acc, scale)
    if ROTARY:
        if end == seq_len:  # the newest key, from registers: one more step of the online softmax
            score = tl.sum(q * k_new.to(tl.float32), axis=0) * scale
            m_new = tl.maximum(m_i, score)
            p_new = tl.exp(score - m_new)
            alpha = tl.exp(m_i - m_new)  # 0 where no cached key came before
            l_i = l_i * alpha + p_new
            acc = acc * alpha + p_new * v_new.to(tl.float32)
            m_i = m_new
    out = out_ptr + q_row * stride_ot + head * stride_oh
    if active == 1:  # every key in this split: its softmax is the whole one (the merge's bits too)
        tl.store(out + dims, (acc / l_i).to(out_ptr.dtype.element_ty))
    else:
        pair = seq * tl.num_programs(1) + head  # this (sequence, head)
        part = pair * NUM_SPLITS + split
        tl.store(part_acc_ptr + part * HEAD_DIM + dims, acc)
        tl.store(part_ml_ptr + part * 2, m_i)
        tl.store(part_ml_ptr + part * 2 + 1, l_i)
        # the last split to count in merges the parts, in split order (kernels/arrivals.py)
        tl.debug_barrier()  # every thread's part is stored before the count says so
        arrived = tl.atomic_add(arrivals_ptr + pair, 1, sem="acq_rel", scope="gpu")
        if arrived == active - 1:
            _merge_splits(part_acc_ptr, part_ml_ptr, pair * NUM_SPLITS, active, out, HEAD_DIM, NUM_SPLITS)
            tl.atomic_xchg(arrivals_ptr + pair, 0)  # zero again for the next launch


# Splitting happens only below this many (sequence, head) programs, so as many arrival counts
# always suffice.
SPLIT_PROGRAMS = 264
# The split decode's shape: keys a tile, warps a program, and the most splits per (sequence,
# head). At batch 1 a step's attention is a chain of memory latencies, not a bandwidth cost (the
# K/V of 17B's 32 heads at 1279 tokens take 4.9 us to read; the kernel took 15), so the shape
# that shortens each program's chain wins: 128-key tiles put a 71-token context in one program
# (no part, count or merge) and a 1279-token one in 10 splits of one tile each.
# benchmarks/kernels/bench_decode_attention.py, H200, 2026-11-27 (RESULTS.md), us a layer with
# PDL, 17B at 71 / 1279 / 4000 tokens: (64, 4) 7.28 / 15.22 / 30.84, (128, 4) 6.85 / 13.59 / 25.65;
# (128, 8) and (32, 4) lost at 1279 and beyond. 32 query heads at batch 1 take 16 splits.
SPLIT_TILE, SPLIT_WARPS, MAX_SPLITS = 128, 4, 16
# With rotary inside, each split's first tile of cached keys loads before the PDL wait (the keys
# before this step's come from earlier steps). On an H200 (nineteenth session) a 17B batch-1 step's
# attention took 0.206 ms with it, 0.229 with the tile after the wait (bench_decode.py's "first K/V
# tile after the wait" mode, its baseline in the same run; the step 3.64 against 3.66 ms). Compiled for sm_90 the
# kernel with its first tile apart takes 168 registers (128 before), and under Triton 3.6 spills
# 8 bytes in bf16 (16 before its splits without keys left ahead of the wait), with either setting.
EARLY_TILE = True


def _split_parts(num_seqs: int, num_heads: int, splits: int, head_dim: int, device: torch.device):
    """Each split's unnormalised output and (max, sum) of its softmax; uninitialised: a split past
    the last key writes nothing, and the merge reads only the splits that hold keys."""
    part_acc = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=device)
    part_ml = torch.empty(num_seqs, num_heads, splits, 2, dtype=torch.float32, device=device)
    return part_acc, part_ml


def decode_splits(num_seqs: int, num_heads: int) -> int:
    """Key splits per (sequence, head) for a decode batch: enough programs to fill an H100/H200's
    132 SMs twice. Measured on an H200 at batch 1, 1,279 tokens of context, CogVLM-17B: one
    program per head walking its keys serially made a decode step 2.11x the HBM floor; 16 splits
    made it 1.80x."""
    programs = num_seqs * num_heads
    return 1 if programs >= SPLIT_PROGRAMS else min(MAX_SPLITS, triton.next_power_of_2(-(-SPLIT_PROGRAMS // programs)))


class NewTokens(NamedTuple):
    """This step's keys and values before rotary, and their cache slots: handed to paged_attention,
    which then rotates q and k and writes K/V itself (kernels/rotary.py's arguments)."""

    k: torch.Tensor  # [T, KV, D], last dim contiguous
    v: torch.Tensor  # [T, KV, D]
    cos: torch.Tensor  # [T, 1, D]
    sin: torch.Tensor  # [T, 1, D]
    slot_mapping: torch.Tensor  # [T] int64: block * block_size + row


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]: every sequence's new tokens, flat
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # same
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32: tokens in the cache per sequence, this step's included
    query_start_loc: torch.Tensor,  # [B + 1] int32: cumulative new-token counts
    max_query_len: int,  # host-side, from the scheduler: sizes the grid without a sync
    pdl: bool = False,  # programmatic dependent launches (kernels/pdl.py)
    new: NewTokens | None = None,  # None: q is rotated and this step's K/V are in the cache already
) -> torch.Tensor:  # [T, num_heads * head_dim]
    """With `new`, rotary and the K/V write happen here (q may be left rotated or not): inside the
    split decode, where a batch-1 step's rotary launch took 1.7 us a layer on an H200 (0.053 ms of
    a 3.75 ms 17B step) and its boundary more; for the one-pass kernel, rotary_and_write_kv_
    launches first."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if head_dim & (head_dim - 1) or block_size & (block_size - 1) or block_size < 16:
        raise ValueError(f"head_dim ({head_dim}) and block_size ({block_size}, >= 16) must be powers of two")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need the same strides and contiguous head_dim; q too")
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    num_seqs = block_tables.shape[0]
    pdl, launch = pdl_launch(pdl, q.device)
    splits = decode_splits(num_seqs, num_heads) if max_query_len == 1 else 1
    if new is not None and splits == 1:  # the one-pass kernel reads the cache: rotary's launch first
        rotary_and_write_kv_(q, *new[:4], k_cache, v_cache, new.slot_mapping, pdl=pdl)
    elif new is not None:
        check_kv_write(q, new.k, new.v, new.cos, new.sin, k_cache, v_cache, new.slot_mapping)
    if splits > 1:  # decode with few programs: split each sequence's keys, then merge (flash-decoding)
        part_acc, part_ml = _split_parts(num_seqs, num_heads, splits, head_dim, q.device)
        k_new, v_new, cos, sin, slots = new if new is not None else (q, q, q, q, seq_lens)  # unread without ROTARY
        _decode_split_kernel[(num_seqs, num_heads, splits)](
            q, k_cache, v_cache, out, part_acc, part_ml, arrival_counts(q.device, SPLIT_PROGRAMS),
            block_tables, seq_lens, query_start_loc, k_new, v_new, cos, sin, slots,
            head_dim**-0.5, num_heads // num_kv_heads,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos.stride(0),
            HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=SPLIT_TILE, NUM_SPLITS=splits,
            ROTARY=new is not None, PDL=pdl, EARLY_TILE=EARLY_TILE, num_warps=SPLIT_WARPS, **launch,
        )  # fmt: skip
        return out.reshape(num_tokens, num_heads * head_dim)
    # Query heads that share a KV head ride in one program as extra rows of the same tiles, so
    # their K/V tiles are loaded once, not once per head (vLLM's Triton attention packs them so).
    group = num_heads // num_kv_heads
    block_m = max(16 if max_query_len <= 16 else 64, triton.next_power_of_2(group))  # decode: small tiles
    grid = (num_kv_heads, num_seqs, triton.cdiv(max_query_len, block_m // group))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        head_dim**-0.5,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, GROUP=group, BLOCK_N=max(64, block_size),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32: the oracle runs in it
        PDL=pdl, **launch,
    )  # fmt: skip
    return out.reshape(num_tokens, num_heads * head_dim)


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len=None):
    """One sequence at a time: gather its blocks, causal SDPA for its newest q_len queries."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = []
    for seq in range(block_tables.shape[0]):
        start, end = int(query_start_loc[seq]), int(query_start_loc[seq + 1])
        seq_len, q_len = int(seq_lens[seq]), end - start
        blocks = block_tables[seq, : triton.cdiv(seq_len, block_size)].long()
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]  # [S, KV, D]
        values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        group = num_heads // num_kv_heads
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # [S, H, D]
        query_pos = seq_len - q_len + torch.arange(q_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]  # [q_len, S]
        ctx = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), keys.transpose(0, 1),
                                             values.transpose(0, 1), attn_mask=mask)  # [H, q_len, D]
        out.append(ctx.transpose(0, 1).reshape(q_len, num_heads * head_dim))
    return torch.cat(out)
