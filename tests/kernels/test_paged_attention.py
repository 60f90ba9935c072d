"""Paged attention kernel against the per-sequence torch reference (interpreter on CPU,
compiled on GPU): decode rows, prefill chunks over a cached prefix, GQA, scattered blocks."""

import pytest
import torch

from kernels.paged_attention import NewTokens, decode_splits, paged_attention, paged_attention_ref
from kernels.rotary import rotary_and_write_kv_
from model.rotary import rotary_cos_sin
from tests.kernels.error_bound import DEVICE, DTYPES


def make_batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, dtype, block_size=16, num_blocks=64):
    generator = torch.Generator().manual_seed(sum(seq_lens))
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    order = torch.randperm(num_blocks, generator=generator)  # blocks scattered across the pool
    tables = order[: len(seq_lens) * max_blocks].reshape(len(seq_lens), max_blocks).to(torch.int32)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator).to(DEVICE, dtype)
    args = (
        q,
        k_cache,
        v_cache,
        tables.to(DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        starts.to(DEVICE),
    )
    return args, max(query_lens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "seq_lens, query_lens",
    [
        ([1], [1]),  # first token
        ([17, 40, 5, 33], [1, 1, 1, 1]),  # decode batch
        ([70], [70]),  # prefill from scratch
        ([70, 90], [22, 1]),  # a chunk over a cached prefix, beside a decode
        ([150, 3, 64], [80, 3, 16]),  # chunks crossing block and tile boundaries
        ([40, 9], [12, 1]),  # a short chunk beside a decode: 16-row tiles, several tokens each under GQA
    ],
)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)], ids=["mha", "gqa2", "mqa"])
def test_paged_attention_matches_reference(dtype, seq_lens, query_lens, heads):
    args, max_q = make_batch(seq_lens, query_lens, *heads, 16, dtype)
    out = paged_attention(*args, max_q)
    ref64 = paged_attention_ref(*[a.double() if a.is_floating_point() else a for a in args])
    base = paged_attention_ref(*args)
    err = (out.double() - ref64).abs().max().item()
    torch_err = (base.double() - ref64).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, (err, torch_err)


@pytest.mark.parametrize("seq_lens, query_lens", [([5 + 3 * i for i in range(24)], [1] * 24), ([90, 30], [37, 30])])
def test_a_group_of_three_heads_packs_into_the_tiles(seq_lens, query_lens):
    """Query heads of one KV head are rows of one tile: 3 a group leaves a tile's 16th row (decode,
    24 sequences: enough programs not to split) and 64th (prefill) unused."""
    args, max_q = make_batch(seq_lens, query_lens, 12, 4, 16, torch.float32, num_blocks=128)
    assert max_q > 1 or decode_splits(len(seq_lens), 12) == 1  # decode: the packed kernel, not the split one
    out = paged_attention(*args, max_q)
    ref64 = paged_attention_ref(*[a.double() if a.is_floating_point() else a for a in args])
    assert (out.double() - ref64).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "seq_lens",
    [[1], [3, 700], [1300], [129, 128, 127, 257, 65]],  # fewer keys than splits, long contexts, tile edges
)
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)], ids=["mha", "mqa"])
def test_split_key_decode_matches_reference(dtype, seq_lens, heads):
    """Small decode batches take the flash-decoding path (keys split over programs, then merged)."""
    assert decode_splits(len(seq_lens), heads[0]) > 1
    args, max_q = make_batch(seq_lens, [1] * len(seq_lens), *heads, 16, dtype, num_blocks=200)
    out = paged_attention(*args, max_q)
    ref64 = paged_attention_ref(*[a.double() if a.is_floating_point() else a for a in args])
    torch_err = (paged_attention_ref(*args).double() - ref64).abs().max().item()
    assert (out.double() - ref64).abs().max().item() <= 2 * torch_err + 1e-5


def test_split_decode_merges_in_one_launch_and_rearms_its_counts():
    """The split that arrives last merges; it must zero its count again, or the next launch (the
    next layer) would never merge and return uninitialised memory. Same bits on every call: the
    merge order does not depend on which split arrives last."""
    from kernels.arrivals import arrival_counts
    from kernels.paged_attention import SPLIT_PROGRAMS

    args, max_q = make_batch([3, 700, 41], [1, 1, 1], 4, 2, 16, torch.float32, num_blocks=200)
    first = paged_attention(*args, max_q)
    assert not arrival_counts(first.device, SPLIT_PROGRAMS).any()
    for _ in range(2):
        assert torch.equal(paged_attention(*args, max_q), first)
    ref64 = paged_attention_ref(*[a.double() if a.is_floating_point() else a for a in args])
    assert (first.double() - ref64).abs().max().item() < 1e-5


def test_split_decode_reads_only_the_splits_that_hold_keys(monkeypatch):
    """Splits past a sequence's last key write nothing (a short context leaves 15 of 16 empty),
    and a sequence whose keys fit one split writes its output directly: a part left from an
    earlier launch (NaN here) must never reach the output."""
    from kernels import paged_attention as module

    real = module._split_parts
    monkeypatch.setattr(module, "_split_parts", lambda *a: tuple(t.fill_(float("nan")) for t in real(*a)))
    seq_lens = [3, 128, 129, 400, 2000]  # one split; one whole tile; 2 splits, the second with 1 key; 4; all 16
    args, max_q = make_batch(seq_lens, [1] * len(seq_lens), 4, 2, 16, torch.float32, num_blocks=640)
    assert decode_splits(len(seq_lens), 4) == 16
    out = paged_attention(*args, max_q)
    ref64 = paged_attention_ref(*[a.double() if a.is_floating_point() else a for a in args])
    assert not out.isnan().any() and (out.double() - ref64).abs().max().item() < 1e-5


@pytest.mark.parametrize("shape", [(32, 4, 16), (128, 8, 32), (64, 4, 64)], ids=lambda s: "x".join(map(str, s)))
def test_every_split_decode_shape_matches_reference(monkeypatch, shape):
    """The split decode's (keys a tile, warps, most splits), which bench_decode_attention.py chooses
    between: one tile a split or several (the next tile's block-table entries load ahead), tiles
    wider than a 16-token block, a 256-token block wider than a tile, and up to 64 splits to merge."""
    from kernels import paged_attention as module

    monkeypatch.setattr(module, "SPLIT_TILE", shape[0])
    monkeypatch.setattr(module, "SPLIT_WARPS", shape[1])
    monkeypatch.setattr(module, "MAX_SPLITS", shape[2])
    for block_size, seq_lens, splits in ((16, [1, 71, 700, 129], 32), (256, [300, 5], 64)):
        args, max_q = make_batch(seq_lens, [1] * len(seq_lens), 4, 2, 16, torch.float32, block_size, num_blocks=200)
        assert decode_splits(len(seq_lens), 4) == min(shape[2], splits)  # 16 and 8 programs unsplit
        out = paged_attention(*args, max_q)
        ref64 = paged_attention_ref(*[a.double() if a.is_floating_point() else a for a in args])
        assert (out.double() - ref64).abs().max().item() < 1e-5


def new_token_rows(seq_lens, args, num_heads, num_kv_heads, head_dim, dtype):
    """This step's raw q, k, v (strided views of one fused QKV output, as the model hands them over),
    their rotary tables, and the cache slot of each sequence's newest key."""
    tables = args[3]
    generator = torch.Generator().manual_seed(7)
    qkv = torch.randn(len(seq_lens), (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
    q, k, v = (t.unflatten(1, (-1, head_dim)) for t in (q, k, v))
    positions = torch.tensor([s - 1 for s in seq_lens], device=DEVICE)
    cos, sin = rotary_cos_sin(positions * 37, head_dim, 10000.0, dtype)  # x37: angles far from zero
    block_size = args[1].shape[1]
    blocks = torch.stack([tables[b, p // block_size] for b, p in enumerate(positions)]).long()
    slots = blocks * block_size + positions % block_size
    return q, NewTokens(k, v, cos, sin, slots)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# 2100: 16 splits of two tiles each (the first loaded before the PDL wait, the second in the loop)
@pytest.mark.parametrize("seq_lens", [[1], [3, 700, 129], [256, 128], [2100]], ids=str)
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa2"])
@pytest.mark.parametrize("split", [True, False], ids=["split", "one-pass"])
def test_attention_that_rotates_and_writes_equals_rotary_then_attention(monkeypatch, dtype, seq_lens, heads, split):
    """paged_attention with this step's raw K/V (`new`) attends over what rotary_and_write_kv_
    leaves (within the kernels' error bound: the newest key joins the softmax last) and leaves the
    same cache, where only the newest slots change. The split decode does it in-kernel, the newest
    key from registers; the other path launches rotary first."""
    from kernels import paged_attention as module

    if not split:
        monkeypatch.setattr(module, "SPLIT_PROGRAMS", 1)  # every decode batch takes the one-pass kernel
    args, max_q = make_batch(seq_lens, [1] * len(seq_lens), *heads, 16, dtype, num_blocks=200)
    assert (decode_splits(len(seq_lens), heads[0]) > 1) == split
    q, new = new_token_rows(seq_lens, args, *heads, 16, dtype)
    q_first, caches_first = q.clone(), [c.clone() for c in args[1:3]]
    rotary_and_write_kv_(q_first, *new[:4], *caches_first, new.slot_mapping)
    rotated = (q_first, *caches_first, *args[3:])  # what attention without `new` would read
    caches = [c.clone() for c in args[1:3]]
    out = paged_attention(q.clone(), *caches, *args[3:], max_q, new=new)
    ref64 = paged_attention_ref(*[a.double() if a.is_floating_point() else a for a in rotated])
    torch_err = (paged_attention_ref(*rotated).double() - ref64).abs().max().item()
    assert (out.double() - ref64).abs().max().item() <= 2 * torch_err + 1e-5
    if DEVICE == "cpu":  # the interpreter rounds alike; compiled code may fuse a multiply-add differently
        assert all(map(torch.equal, caches, caches_first))
    else:
        for cache, first in zip(caches, caches_first, strict=True):
            torch.testing.assert_close(cache, first, rtol=1e-2, atol=1e-2)
    written = torch.zeros(args[1].shape[0] * args[1].shape[1], dtype=torch.bool, device=DEVICE)
    written[new.slot_mapping] = True
    for cache, before in zip(caches, args[1:3], strict=True):
        flat, flat_before = cache.flatten(0, 1), before.flatten(0, 1)
        assert torch.equal(flat[~written], flat_before[~written])  # nothing but the newest slots
        assert not torch.equal(flat[written], flat_before[written])


@pytest.mark.parametrize("seq_lens", [[1], [3, 700, 129], [2100]], ids=str)
def test_the_first_tile_loads_alike_before_and_after_the_wait(monkeypatch, seq_lens):
    """kernels/paged_attention.py EARLY_TILE moves where the split decode loads its first tile of
    cached K/V (before the PDL wait, or after it: bench_decode.py's baseline), never what it computes."""
    from kernels import paged_attention as module

    args, max_q = make_batch(seq_lens, [1] * len(seq_lens), 4, 2, 16, torch.float32, num_blocks=200)
    outs = []
    for early in (True, False):
        monkeypatch.setattr(module, "EARLY_TILE", early)
        q, new = new_token_rows(seq_lens, args, 4, 2, 16, torch.float32)
        caches = [c.clone() for c in args[1:3]]
        outs.append((paged_attention(q, *caches, *args[3:], max_q, new=new), caches))
    assert torch.equal(outs[0][0], outs[1][0]) and all(map(torch.equal, outs[0][1], outs[1][1]))


@pytest.mark.parametrize("seq_lens", [[9], [9] * 80], ids=["split", "one-pass"])
def test_attention_that_rotates_refuses_what_rotary_refuses(seq_lens):
    args, max_q = make_batch(seq_lens, [1] * len(seq_lens), 4, 2, 16, torch.float32, num_blocks=100)
    q, new = new_token_rows(seq_lens, args, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_attention(q, *args[1:], max_q, new=new._replace(slot_mapping=new.slot_mapping[:0]))
    with pytest.raises(ValueError, match="v must be shaped like k"):
        paged_attention(q, *args[1:], max_q, new=new._replace(v=new.v[:, :1]))


def test_decode_splits_fill_the_gpu_and_stop_when_full():
    assert decode_splits(1, 32) == 16  # batch 1 of CogVLM-17B: 32 programs -> 512
    assert decode_splits(4, 32) == 4
    assert decode_splits(64, 32) == 1  # 2,048 programs: no split, one kernel
    assert decode_splits(1, 1) == 16  # at most 16


def test_rejects_shapes_it_cannot_tile():
    args, max_q = make_batch([5], [5], 4, 4, 16, torch.float32, block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        paged_attention(*args, max_q)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_lens, query_lens", [([300], [1]), ([17, 40, 5, 33], [1, 1, 1, 1]), ([70, 90], [22, 1])])
def test_programmatic_dependent_launch_changes_nothing(seq_lens, query_lens):
    """pdl=True (sm_90+): split decode, merge and the one-pass kernel wait before reading; the
    same bits as ordinary launches, eager and replayed from a CUDA graph behind a kernel that
    writes q (a wait in the wrong place would read the old q)."""
    args, max_q = make_batch(seq_lens, query_lens, 4, 2, 64, torch.bfloat16, num_blocks=200)
    want = paged_attention(*args, max_q)
    q_new = args[0].clone()
    q = torch.zeros_like(q_new)
    run = lambda: (q.copy_(q_new), paged_attention(q, *args[1:], max_q, pdl=True))[1]  # noqa: E731
    assert torch.equal(run(), want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(3):
        q.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
