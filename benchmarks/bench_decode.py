"""GPU decode: a full-size CogVLM architecture (17B by default) with random bf16 weights through the engine.

Reports the decode step time at batch 1 against the HBM floor (bytes of the weights a text
decode step reads, i.e. the language experts, norms and lm_head, over the bandwidth of a large
device-to-device copy measured in the same run; target within 1.2x), and output tokens/s at
batch 64.

    python benchmarks/bench_decode.py [--steps 30] [--modes PDL,one-row] [--arch cogvlm2-19b]

CogVLM2-19B (GQA: 8 KV heads; a 128k vocabulary) is gpu_check.sh's `decode2` part.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time
from typing import NamedTuple

import torch
import triton

import kernels.gemv as gemv_module
import kernels.paged_attention as attention_module
import model.cogvlm as cogvlm_module
from benchmarks.full_size import ARCHITECTURES, DigitTokenizer, random_model
from model.processor import Conversation, Processor
from model.sampling_params import SamplingParams
from server.engine import Engine, EngineConfig


def copy_bandwidth() -> float:
    """Bytes per second of a 4 GiB device-to-device copy, counting bytes read and written."""
    src = torch.empty(2**31, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def decode_step_ms(engine: Engine, steps: int, tokens: list[int] | None = None) -> float:
    """Mean wall time per step over `steps` decode steps in a row: with look-ahead a step's host
    work overlaps the previous step's GPU work, so steps are timed back to back, not one by one.
    `tokens` collects every token the steps put out (a batch-1 run: that request's)."""
    outputs = []
    while any(r.num_computed_tokens < r.seq.num_prompt_tokens for r in engine.scheduler.running) or \
            engine.scheduler.waiting:  # fmt: skip
        outputs += engine.step()
    for _ in range(3):  # into the steady state (look-ahead starts from the second decode step)
        outputs += engine.step()
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)  # CPU: tests
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        outputs += engine.step()
    sync()
    elapsed = time.perf_counter() - start
    if tokens is not None:
        tokens += [t for o in outputs for t in o.new_token_ids]
    return elapsed * 1e3 / steps


def crowded_decode(engine: Engine, prompts: list, params, steps: int, weight_bytes: int, bandwidth: float,
                   before_abort=None):  # fmt: skip
    """Up to len(prompts) sequences, each an image prompt's length, decoding together (as many as
    the KV pool holds without preempting): (sequences, ms a step, the floor). The prompts differ
    from their first token, so no cached block is shared and every sequence's keys and values
    come from HBM: the floor adds them, at the timed steps' mean context, to the weights.
    before_abort(sequences) runs while they still hold their blocks (a replay of the last step
    then writes into blocks still theirs)."""
    cfg = engine.model.config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * engine.model.dtype.itemsize  # K and V
    length = prompts[0].num_tokens
    # The prompts prefill at the step budget (2048 tokens: ~40 steps for 64 prompts of 1.3k), and
    # the first admitted decode all the while: max_tokens covers those steps, the 3 settling ones
    # and the timed ones, so no sequence ends while timed. With params' own 46 the first ones did,
    # and the 17B read "0.86x the floor" at 64 sequences (nineteenth session).
    budget = engine.config.max_num_batched_tokens
    prefill_steps = -(-len(prompts) * length // max(1, budget - len(prompts)))
    params = dataclasses.replace(params, max_tokens=prefill_steps + 3 + steps + 2)  # 2: look-ahead's token in flight
    blocks_each = -(-(length + params.max_tokens) // engine.config.block_size)
    sequences = min(len(prompts), engine.kv.num_free_blocks // blocks_each)
    for i in range(sequences):
        engine.add_request(f"crowd{i}", prompts[i], params)
    ms = decode_step_ms(engine, steps)
    crowd = [r for r in engine.scheduler.running if r.request_id.startswith("crowd")]
    if len(crowd) != sequences:
        raise RuntimeError(f"{sequences - len(crowd)} of the {sequences} crowded sequences left the batch while timed")
    if before_abort is not None:
        before_abort(sequences)
    for i in range(sequences):
        engine.abort(f"crowd{i}")
    # each timed step added one token a sequence: the context read, on average, is half of them fewer
    mean_tokens = sum(r.num_tokens for r in crowd) - sequences * steps / 2
    floor_ms = (weight_bytes + mean_tokens * per_token) / bandwidth * 1e3
    return sequences, ms, floor_ms


def step_kernels(replay, steps: int = 5) -> list:
    """The profiler's per-kernel totals over `steps` replays of a graph, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(events, key=lambda e: e.device_time_total, reverse=True)


def attention_ms(events, steps: int = 5) -> float:
    """GPU time a replayed step spends in the paged-attention kernels (ms), from step_kernels. On
    an H200 (eighth session) the split decode took 0.31 ms of a 3.8 ms batch-1 step at a short
    prompt, and the step grew by 0.36 ms at an image request's context: this times that share."""
    return sum(e.device_time_total for e in events if "attention" in e.key or "decode_split" in e.key) / steps / 1e3


def kernel_times(events, steps: int = 5, rows: int = 12) -> str:
    """Where a replayed step's GPU time goes, from step_kernels: per-kernel totals per step."""
    lines = [
        f"  {e.device_time_total / steps / 1e3:7.3f} ms  {e.count // steps:5d}x  {e.key[:90]}" for e in events[:rows]
    ]
    return "\n".join(lines) or "  (the profiler saw no kernels inside the graph)"


def chosen_gemv_configs(cache: dict) -> str:
    """The autotuner's choices, by its key's (N, K, PROLOGUE): which configs a step ran."""
    names = {gemv_module.PLAIN: "plain", gemv_module.RMS_NORM: "rms_norm", gemv_module.SILU_AND_MUL: "silu_and_mul"}
    out = []
    for key, config in sorted(cache.items(), key=lambda item: str(item[0])):
        kw = config.kwargs
        out.append(f"{key[0]}x{key[1]} {names.get(key[2], key[2])}: {kw['BLOCK_N']}, {kw['BLOCK_K']}, "
                   f"{config.num_warps}, {kw['STAGES']}, {kw['AHEAD']}")  # fmt: skip
    return "; ".join(out)


class Mode(NamedTuple):
    """How a decode benchmark mode runs; the defaults are the engine's on a Hopper GPU."""

    cuda_graphs: bool = True
    look_ahead: bool = True  # async scheduling
    one_row_gemv: bool = True  # kernels/gemv.py at batch 1; else cuBLAS
    pdl: bool = True  # kernels/pdl.py
    early_trigger: frozenset[str] = cogvlm_module.EARLY_TRIGGER  # which GEMVs trigger early (model/cogvlm.py)
    gemv_candidates: bool = False  # kernels/gemv.py's CANDIDATE_CONFIGS join the tuning
    gemv_in_graph: bool = False  # EngineConfig.tune_gemv_in_graph: GEMV configs timed in a graph chain
    early_tile: bool = True  # kernels/paged_attention.py's EARLY_TILE: the first K/V tile before the PDL wait
    l2_prefetch: frozenset[str] = cogvlm_module.L2_PREFETCH  # which GEMVs ask L2 for their weights first
    gemv_pins: bool = True  # EngineConfig.pin_tuned_gemvs: kernels/gemv.py's TUNED configs for this card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--modes", default="", help="comma-separated substrings: run only the modes whose name "
                        "contains one (e.g. 'early:,GEMV c'); cuBLAS's and the default mode always run")  # fmt: skip
    parser.add_argument("--arch", default="cogvlm-17b", choices=[a for a in ARCHITECTURES if "tiny" not in a])
    parser.add_argument("--split-decode", default="", metavar="TILE,WARPS,SPLITS",
                        help="the split decode's shape (kernels/paged_attention.py), e.g. the best of "
                        "bench_decode_attention.py; default: the shipped one")  # fmt: skip
    args = parser.parse_args()
    if args.split_decode:
        shape = tuple(int(v) for v in args.split_decode.split(","))
        attention_module.SPLIT_TILE, attention_module.SPLIT_WARPS, attention_module.MAX_SPLITS = shape
    model = random_model(args.arch)
    language_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                         if "vision" not in n and "embed_tokens" not in n)  # fmt: skip
    bandwidth = copy_bandwidth()
    torch.cuda.empty_cache()  # the copy's 8 GiB go back before the KV pool is sized from free memory
    floor_ms = language_bytes / bandwidth * 1e3
    processor = Processor(DigitTokenizer(), model.config)
    prompt = processor.build(Conversation(query="Describe the weather in three long sentences please."))
    long_prompt = processor.build(Conversation(query="7" * 1260))  # ~1.3k tokens of context
    crowd = [processor.build(Conversation(query=f"{i:02d}" + "7" * 1258)) for i in range(64)]  # no shared blocks
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 16, ignore_eos=True)

    results, replays, kernel_tables, long_ms, attention = {}, {}, {}, {}, {}
    crowded = {}  # mode -> (sequences, ms a step, floor ms, attention ms a step): an image prompt's length each
    modes = {  # the second is the engine's default
        "cuda graphs + look-ahead": Mode(one_row_gemv=False, pdl=False),
        "cuda graphs + look-ahead + one-row GEMV + PDL": Mode(),
        "cuda graphs + look-ahead + one-row GEMV + PDL, no L2 prefetch": Mode(l2_prefetch=frozenset()),
        "cuda graphs + look-ahead + one-row GEMV + PDL, first K/V tile after the wait": Mode(early_tile=False),
        "cuda graphs + look-ahead + one-row GEMV + PDL, GEMV candidates": Mode(gemv_candidates=True),
        "cuda graphs + look-ahead + one-row GEMV + PDL, GEMV tuned in a graph": Mode(gemv_in_graph=True),
        # the default pins TUNED's configs on a card it names; this times the autotuner's picks
        # against them (twice: they vary from run to run)
        "cuda graphs + look-ahead + one-row GEMV + PDL, autotuner's GEMV picks": Mode(gemv_pins=False),
        # the default once more, last: how far the same code drifts within a run (3.78 and 3.73 ms
        # replayed in one run, twelfth session, with different GEMV configs picked by the autotuner)
        "cuda graphs + look-ahead + one-row GEMV + PDL, again": Mode(),
        "cuda graphs + look-ahead + one-row GEMV + PDL, GEMV tuned in a graph, again": Mode(gemv_in_graph=True),
        "cuda graphs + look-ahead + one-row GEMV + PDL, autotuner's GEMV picks, again": Mode(gemv_pins=False),
    }  # not rerun, to keep gpu_check short (RESULTS.md has them): eager, 15.7 ms a step at batch 1 on an
    # H200; cuda graphs without look-ahead, 4.96 ms (17B, tenth session); the one-row GEMV without
    # PDL, 3.90 against 3.77 to 3.82 with it (twelfth); no early trigger, within 0.03 ms of the early
    # trigger on dense and down in three runs (eleventh and twelfth); every GEMV triggering
    # early, 4.03 ms against 3.82; rotary kept apart from the split decode, 3.83 against 3.82; early
    # triggers on dense, gate_up and down, 3.89 against 3.83 replayed (17B, eleventh session);
    # persistent GEMVs on qkv and gate_up, 4.23 against 3.73 to 3.78 replayed; rotary's cos and sin
    # computed each step instead of looked up, 3.73 (the same, twelfth session); the L2 prefetch on
    # all four GEMVs instead of dense alone, 3.99 against 3.64; another fast set of GEMV picks pinned
    # (the autotuner's in the "no L2 prefetch" mode), 3.62 against TUNED's 3.61 (nineteenth session).
    if args.modes:
        wanted = [w.strip() for w in args.modes.split(",") if w.strip()]
        # the cuBLAS mode (the first) and the engine's default always run, as the baselines
        modes = {m: v for i, (m, v) in enumerate(modes.items()) if i == 0 or v == Mode() or any(w in m for w in wanted)}
    batch1_tokens = {}  # greedy tokens of the batch-1 run per mode: the GEMV paths should agree
    gemv_kernel = gemv_module._gemv_kernel
    gemv_configs = list(gemv_kernel.configs)
    chosen = {}  # mode -> the GEMV configs the autotuner chose, by (N, K, prologue)
    crowd_modes = {next(iter(modes)), next((name for name, m in modes.items() if m == Mode()), None)}
    for mode, m in modes.items():
        if m.gemv_candidates and not gemv_module.CANDIDATE_CONFIGS:
            continue  # the same as the default mode
        cogvlm_module.EARLY_TRIGGER, attention_module.EARLY_TILE = m.early_trigger, m.early_tile
        cogvlm_module.L2_PREFETCH = m.l2_prefetch
        gemv_kernel.configs = gemv_configs + (gemv_module.CANDIDATE_CONFIGS if m.gemv_candidates else [])
        gemv_kernel.cache = {}  # tuned again per mode: a candidate may win a shape
        gemv_module.unpin_all()  # and pinned again by the engine (TUNED, or tuned in a graph)
        look_ahead = m.look_ahead
        # text-only steps never run the routed expert kernels: nothing to tune at start
        config = EngineConfig(max_num_seqs=64, gpu_memory_fraction=0.5, cuda_graphs=m.cuda_graphs,
                              async_scheduling=m.look_ahead, one_row_gemv=m.one_row_gemv, pdl=m.pdl,
                              tune_expert_kernels=False, tune_gemv_in_graph=m.gemv_in_graph,
                              pin_tuned_gemvs=m.gemv_pins)  # fmt: skip
        try:  # a mode that fails (a new kernel on a new machine) is reported; the others still run
            engine = Engine(model, processor, config)
            engine.add_request("warmup", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
            while engine.has_unfinished:
                engine.step()
            engine.add_request("one", prompt, params)
            batch1_tokens[mode] = []
            batch1_ms = decode_step_ms(engine, args.steps, batch1_tokens[mode])
            engine.abort("one")
            for i in range(64):
                engine.add_request(f"b{i}", prompt, params)
            results[mode] = (batch1_ms, decode_step_ms(engine, args.steps))
            graphs = engine.runner.decode_graphs
            if graphs is not None and look_ahead:  # the GPU time of the step itself; the rest is the host's
                replays[mode] = {b: triton.testing.do_bench(graphs.graphs[b].replay, warmup=5, rep=50,
                                                            return_mode="median") for b in (1, 64)}  # fmt: skip
                events = step_kernels(graphs.graphs[1].replay)
                kernel_tables[mode] = kernel_times(events)
                short_attention = attention_ms(events)
                for i in range(64):
                    engine.abort(f"b{i}")
                # an image prompt's length (1227 patches + text): the attention kernel's share grows
                engine.add_request("long", long_prompt, params)
                long_ms[mode] = decode_step_ms(engine, args.steps)
                # the graph replays the last step's inputs: the long request's
                attention[mode] = (short_attention, attention_ms(step_kernels(graphs.graphs[1].replay)))
                engine.abort("long")
                if mode in crowd_modes:  # serving's usual shape, every sequence an image's length. The two
                    # modes differ there only in PDL on attention (batch 64 runs cuBLAS): 17B read 14.47 and
                    # 14.53 ms a step, 1.08x and 1.09x its floor (nineteenth session, 64 sequences each)
                    share = {}

                    def attention_share(sequences, graphs=graphs, share=share):
                        size = next(s for s in graphs.sizes if s >= sequences)  # the graph that ran
                        share["ms"] = attention_ms(step_kernels(graphs.graphs[size].replay))

                    runs = crowded_decode(engine, crowd, params, args.steps, language_bytes, bandwidth, attention_share)
                    crowded[mode] = (*runs, share.get("ms", float("nan")))
            chosen[mode] = chosen_gemv_configs({**gemv_kernel.cache, **gemv_module.pinned()})
        except Exception as err:  # noqa: BLE001
            print(f"mode {mode!r} failed: {type(err).__name__}: {str(err)[:300]}")
        # the graphs (and the closure below) hold this engine's KV pool: the next mode's pool is sized
        # from free memory, and had 40 sequences where the first had 64 while they lived (nineteenth)
        engine = graphs = attention_share = None
        gc.collect()
        torch.cuda.empty_cache()
    cogvlm_module.EARLY_TRIGGER, attention_module.EARLY_TILE = Mode().early_trigger, Mode().early_tile
    cogvlm_module.L2_PREFETCH = Mode().l2_prefetch
    gemv_kernel.configs, gemv_kernel.cache = gemv_configs, {}
    gemv_module.unpin_all()
    base = batch1_tokens.get("cuda graphs + look-ahead", [])
    for mode, tokens in batch1_tokens.items():
        n = min(len(tokens), len(base))
        same = next((i for i in range(n) if tokens[i] != base[i]), n)
        print(f"batch-1 greedy tokens, {mode}: the first {same} of {len(tokens)} equal cuBLAS's (the first mode)")

    split = (attention_module.SPLIT_TILE, attention_module.SPLIT_WARPS, attention_module.MAX_SPLITS)
    print(f"\ndecode, {args.arch} architecture, random bf16 weights, {torch.cuda.get_device_name()}, "
          f"split decode (tile, warps, splits) {split}")  # fmt: skip
    print(
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); language weights {language_bytes / 2**30:.1f} GiB"
    )
    print(f"HBM floor at batch 1: {floor_ms:.2f} ms per step (target: within 1.2x)")
    for mode, table in kernel_tables.items():
        print(f"GPU time per batch-1 step by kernel, {mode} (profiler over graph replays):")
        print(table)
    for mode, replay in replays.items():
        print(f"graph replay alone (GPU time of a step), {mode}: batch 1 {replay[1]:.2f} ms "
              f"({replay[1] / floor_ms:.2f}x the floor), batch 64 {replay[64]:.2f} ms; batch 1 at "
              f"{long_prompt.num_tokens} tokens of context: {long_ms.get(mode, float('nan')):.2f} ms a step "
              f"({long_ms.get(mode, float('nan')) / floor_ms:.2f}x)")  # fmt: skip
    print("the rest of a step is host work (scheduler, inputs, sampler, detokenizer)")
    for mode, configs in chosen.items():
        print(f"GEMV configs (N x K prologue: BLOCK_N, BLOCK_K, warps, stages, ahead), {mode}: {configs}")
    for mode, (short, long) in attention.items():
        print(f"attention kernels, {mode}: {short:.3f} ms a batch-1 step at {prompt.num_tokens} tokens of "
              f"context, {long:.3f} ms at {long_prompt.num_tokens}")  # fmt: skip
    for mode, (sequences, ms, floor, attention_share_ms) in crowded.items():
        print(f"crowded decode, {mode}: {sequences} sequences at {long_prompt.num_tokens} tokens of context: "
              f"{ms:.2f} ms a step, {sequences / ms * 1e3:.0f} tokens/s; floor (weights + K/V read) {floor:.2f} ms, "
              f"{ms / floor:.2f}x; attention kernels {attention_share_ms:.2f} ms a step")  # fmt: skip
    print("| mode | batch 1 ms/step | vs floor | batch 64 ms/step | batch 64 tokens/s |")
    print("|---|---|---|---|---|")
    for mode, (one, many) in results.items():
        print(f"| {mode} | {one:.2f} | {one / floor_ms:.2f}x | {many:.2f} | {64 / many * 1e3:.0f} |")


if __name__ == "__main__":
    main()
