"""The calls tests/kernels/hopper_compile.py compiles: each kernel wrapper the CUDA path uses, at
the shapes that reach it (CogVLM-17B's and CogVLM2's, and the GPU tests' small and odd ones), as
(label, thunk) pairs. Under HopperStandIn their launches compile the kernels and run nothing."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton


def _choose(configs: list, quick: bool, keys: tuple[str, ...], variants=(lambda c: True,)) -> list:
    """Quick: for each variant (a predicate a call's pruning applies), the first config it keeps
    of each combination of `keys` (TMA level, stream-K)."""
    if not quick:
        return configs
    chosen = {}  # (variant, kind) -> config
    for i, keeps in enumerate(variants):
        for c in configs:
            if keeps(c):
                chosen.setdefault((i, *(c.kwargs[k] for k in keys)), c)
    return list(dict.fromkeys(chosen.values()))  # one config may serve several variants


def production_calls(quick: bool, dtype: torch.dtype) -> list[tuple[str, Callable]]:
    """(label, thunk) for each call the CUDA engine makes, at full-size shapes."""
    from kernels import expert_linear, gemv, paged_attention, rms_norm, rotary
    from kernels.activation import silu_and_mul
    from kernels.expert_routing import route_by_expert

    size = torch.tensor([], dtype=dtype).element_size()
    expert_linear._expert_linear_kernel.configs = _choose(
        expert_linear.GPU_CONFIGS + expert_linear.CANDIDATE_CONFIGS, quick, ("TMA", "SK"),
        [lambda c, gated=gated: expert_linear.fits(c, size, gated) for gated in (False, True)],
    )  # fmt: skip
    gemv._gemv_kernel.configs = _choose(gemv.GPU_CONFIGS + gemv.CANDIDATE_CONFIGS, quick, ("STAGES", "AHEAD"))
    pdl_modes = (True,) if quick else (False, True)  # PDL only adds an instruction: quick takes the superset

    def t(*shape):
        return torch.empty(*shape, dtype=dtype)

    hidden, tokens = 4096, 1227 + 40  # one image of CogVLM-17B and a question
    mask = torch.zeros(tokens, dtype=torch.bool)
    mask[5:1232] = True
    x, row, norm = t(tokens, hidden), t(1, hidden), t(hidden)

    def projections(qkv: int, intermediate: int, vision_bias: bool):
        expert_linear.expert_linear(x, mask, t(qkv, hidden), t(qkv, hidden), None, t(qkv) if vision_bias else None)
        expert_linear.expert_gated_up(x, mask, *(t(intermediate, hidden) for _ in range(4)))
        expert_linear.expert_linear(t(tokens, intermediate), mask, t(hidden, intermediate), t(hidden, intermediate))

    def one_row(pdl: bool, early: bool = False):
        gemv.gemv(row, t(hidden, hidden), pdl=pdl, early_trigger=early)  # o_proj
        gemv.gemv(row, t(hidden, hidden), pdl=pdl, early_trigger=early, prefetch=True)  # o_proj as the model runs it
        # the others with the L2 prefetch (the kernel takes it with any prologue; on all four a 17B step lost
        # 0.35 ms on an H200, nineteenth session): a tail of K past its tiles in down
        gemv.rms_norm_gemv(row, row, norm, 1e-5, t(3 * hidden, hidden), pdl, early, prefetch=True)
        gemv.silu_and_mul_gemv(t(1, 2 * 11008), t(hidden, 11008), pdl=pdl, early_trigger=early, prefetch=True)
        gemv.rms_norm_gemv(row, row, norm, 1e-5, t(3 * hidden, hidden), pdl, early)  # qkv, gate_up
        gemv.rms_norm_gemv(row, None, norm, 1e-5, t(3 * hidden, hidden), pdl=pdl)  # the first layer's qkv
        gemv.silu_and_mul_gemv(t(1, 2 * 11008), t(hidden, 11008), pdl=pdl, early_trigger=early)  # down
        gemv.rms_norm_gemv(row, row, norm, 1e-5, t(4 * hidden, hidden), pdl, out_dtype=torch.float32)  # lm_head

    def attention(seqs: int, query_len: int, kv_heads: int, block_size: int, pdl: bool):
        context = tokens + 64
        blocks = triton.cdiv(context, block_size)
        cache = t(seqs * blocks, block_size, kv_heads, 128)
        tables = torch.arange(seqs * blocks, dtype=torch.int32).reshape(seqs, blocks)
        lens = torch.full((seqs,), context, dtype=torch.int32)
        starts = torch.arange(seqs + 1, dtype=torch.int32) * query_len
        q, k, cos = t(seqs * query_len, 32, 128), t(seqs * query_len, kv_heads, 128), t(seqs * query_len, 1, 128)
        new = paged_attention.NewTokens(k, k, cos, cos, torch.arange(seqs * query_len))  # as the engine calls it
        paged_attention.paged_attention(q, cache, cache, tables, lens, starts, query_len, pdl, new)

    def rotate(kv_heads: int, pdl: bool):
        q, k, cos = t(64, 32, 128), t(64, kv_heads, 128), t(64, 1, 128)
        cache = t(8, 16, kv_heads, 128)
        rotary.rotary_and_write_kv_(q, k, k.clone(), cos, cos.clone(), cache, cache.clone(), torch.arange(64), pdl)

    def grouped_projections():  # kernels/grouped_expert_linear.py: --expert-rows grouped
        from kernels import grouped_expert_linear as grouped

        grouped._grouped_expert_kernel.configs = _choose(
            grouped.PLAIN_CONFIGS + grouped.GATED_CONFIGS, quick, ("WS",),
            [lambda c: c in grouped.PLAIN_CONFIGS, lambda c: c in grouped.GATED_CONFIGS],
        )  # fmt: skip
        routing = route_by_expert(mask, in_slots=True)
        slots = t(routing.num_slots, hidden)
        grouped.grouped_expert_linear(slots, routing, t(hidden, hidden), t(hidden, hidden), None, t(hidden))
        grouped.grouped_gated_up(slots, routing, *(t(11008, hidden) for _ in range(4)))

    calls = [
        ("17B projections", lambda: projections(3 * hidden, 11008, False)),
        ("CogVLM2 projections", lambda: projections(hidden + 2 * 1024, 14336, True)),  # 8 KV heads, vision QKV bias
        ("grouped-rows projections", grouped_projections),
    ]

    calls.append(("one-row GEMVs pdl=True early trigger", lambda: one_row(True, early=True)))
    for pdl in pdl_modes:
        calls.append((f"one-row GEMVs pdl={pdl}", lambda pdl=pdl: one_row(pdl)))
        for kv in (32, 8):  # 17B, CogVLM2 (GQA)
            calls += [
                (f"attention decode batch 1 kv={kv} pdl={pdl}", lambda kv=kv, pdl=pdl: attention(1, 1, kv, 16, pdl)),
                (f"attention decode batch 64 kv={kv} pdl={pdl}", lambda kv=kv, pdl=pdl: attention(64, 1, kv, 16, pdl)),
                (f"attention prefill chunk kv={kv} pdl={pdl}", lambda kv=kv, pdl=pdl: attention(2, 512, kv, 16, pdl)),
            ]
        calls += [
            (f"attention block 256 pdl={pdl}", lambda pdl=pdl: attention(4, 1, 32, 256, pdl)),
            (f"rotary and K/V write pdl={pdl}", lambda pdl=pdl: rotate(32, pdl)),
            (f"rotary and K/V write GQA pdl={pdl}", lambda pdl=pdl: rotate(8, pdl)),
        ]
    calls += [
        ("rotary alone", lambda: rotary.rotary_embedding_(t(64, 32, 128), t(64, 8, 128), t(64, 1, 128), t(64, 1, 128))),
        ("rms_norm", lambda: rms_norm.rms_norm(x, norm, 1e-5)),
        ("rms_norm residual", lambda: rms_norm.rms_norm(x, norm, 1e-5, x.clone())),
        ("silu_and_mul", lambda: silu_and_mul(t(tokens, 11008), t(tokens, 11008))),
    ]
    return calls


def small_shape_calls(dtype: torch.dtype) -> list[tuple[str, Callable]]:
    """The tiny test checkpoints' shapes (model/tiny_checkpoint.py: hidden 64, 4 heads of 16, 2 KV
    heads in generation 2) and odd ones from the kernel tests: what the GPU tests compile, so a
    constexpr only they reach (a head of 16, K = 72) fails here rather than in a device session."""
    from kernels import expert_linear, gemv, paged_attention, rotary

    def t(*shape):
        return torch.empty(*shape, dtype=dtype)

    mask = torch.arange(130) % 3 == 0

    def attention(query_len: int, kv_heads: int):
        cache = t(16, 16, kv_heads, 16)
        tables = torch.arange(16, dtype=torch.int32).reshape(2, 8)
        lens, starts = torch.tensor([100, 37], dtype=torch.int32), torch.tensor([0, query_len, 2 * query_len])
        paged_attention.paged_attention(t(2 * query_len, 4, 16), cache, cache, tables, lens, starts.int(), query_len)

    def rotate(kv_heads: int):
        q, k, cos = t(7, 4, 16), t(7, kv_heads, 16), t(7, 1, 16)
        cache = t(4, 16, kv_heads, 16)
        rotary.rotary_and_write_kv_(q, k, k.clone(), cos, cos.clone(), cache, cache.clone(), torch.arange(7))

    row = t(1, 64)
    return [
        ("tiny projections", lambda: (
            expert_linear.expert_linear(t(130, 64), mask, t(192, 64), t(192, 64), None, t(192)),
            expert_linear.expert_gated_up(t(130, 64), mask, *(t(160, 64) for _ in range(4))),
            expert_linear.expert_linear(t(130, 160), mask, t(64, 160), t(64, 160)),
        )),
        ("odd projection, K 72, N 200", lambda: expert_linear.expert_linear(t(7, 72), mask[:7], *[t(200, 72)] * 2)),
        ("tiny one-row GEMVs", lambda: (
            gemv.rms_norm_gemv(row, row, t(64), 1e-5, t(192, 64)),
            gemv.silu_and_mul_gemv(t(1, 320), t(64, 160)),
            gemv.gemv(t(1, 72), t(200, 72)),
        )),
        ("tiny attention", lambda: [attention(q, kv) for q in (1, 40) for kv in (4, 2)]),
        ("tiny rotary and K/V write", lambda: [rotate(kv) for kv in (4, 2)]),
    ]  # fmt: skip
