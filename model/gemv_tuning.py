"""The batch-1 decode GEMVs' configs, chosen in the chain they run in (kernels/gemv.py, pin).

Why: Triton's autotuner times each GEMV config alone, outside a graph, where the configs of
kernels/gemv.py lie within about 1% of each other, so its pick varies from run to run: on an H200
one run at the same code read a CogVLM-17B batch-1 step at 3.73 and at 3.78 ms replayed with
different picks (RESULTS.md, twelfth session). A step replays each projection in a CUDA graph
after other kernels, with programmatic dependent launch; there the same configs differ by up to
5 us a launch (bench_gemv.py: down 23.1 to 27.8 us). Here each projection runs over every layer's
weights in one captured graph, as bench_gemv.py times it, once per config, and the fastest is
pinned for that call shape.

CUDA only (graphs); the engine runs it before capturing its decode graphs, when asked
(EngineConfig.tune_gemv_in_graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

import kernels.gemv as gemv_module
from kernels.gemv import PLAIN, RMS_NORM, SILU_AND_MUL, gemv, rms_norm_gemv, silu_and_mul_gemv


@dataclass(frozen=True)
class Projection:
    """One of a decoder layer's batch-1 GEMVs, as DecoderLayer._forward_one_text_row runs it."""

    name: str  # as model/cogvlm.py's EARLY_TRIGGER names it
    prologue: int  # kernels/gemv.py's
    weight: Callable  # layer -> [N, K] weight
    norm: Callable | None = None  # layer -> its RMSNorm (the RMS_NORM prologue)


PROJECTIONS = (
    Projection("qkv", RMS_NORM, lambda layer: layer.self_attn.language_expert_query_key_value.weight,
               lambda layer: layer.input_layernorm),
    Projection("dense", PLAIN, lambda layer: layer.self_attn.language_expert_dense.weight),
    Projection("gate_up", RMS_NORM, lambda layer: layer.mlp.language_gate_up,
               lambda layer: layer.post_attention_layernorm),
    Projection("down", SILU_AND_MUL, lambda layer: layer.mlp.language_mlp.down_proj.weight),
)  # fmt: skip


def chain(projection: Projection, layers, pdl: bool, early: bool, prefetch: bool = False) -> Callable[[], None]:
    """The projection over every layer's weights, back to back from one input row (what a step's
    32 launches of it read: each weight once from HBM)."""
    weight0 = projection.weight(layers[0])
    n_in = weight0.shape[1]
    device, dtype = weight0.device, weight0.dtype
    x = torch.randn(1, 2 * n_in if projection.prologue == SILU_AND_MUL else n_in, device=device, dtype=dtype) * 0.1
    residual = torch.randn(1, n_in, device=device, dtype=dtype) * 0.1
    weights = [projection.weight(layer) for layer in layers]
    if projection.prologue == RMS_NORM:
        pairs = [(projection.norm(layer), w) for layer, w in zip(layers, weights, strict=True)]
        return lambda: [rms_norm_gemv(x, residual, n.weight, n.eps, w, pdl, early, prefetch=prefetch) for n, w in pairs]
    if projection.prologue == SILU_AND_MUL:
        return lambda: [silu_and_mul_gemv(x, w, pdl, early, prefetch) for w in weights]
    return lambda: [gemv(x, w, pdl, early, prefetch) for w in weights]


def graph_ms(fn: Callable[[], None], warmup: int = 5, rep: int = 40) -> float:
    """Median ms of one replay of fn captured in a CUDA graph (fn runs once first: it compiles and
    allocates outside the capture). The GEMV and attention benchmarks time their chains with it."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")


@torch.inference_mode()
def tune_one_row_gemvs(
    layers,
    pdl: bool,
    early_trigger: frozenset[str],
    configs=None,
    timer: Callable = graph_ms,
    prefetch: frozenset[str] = frozenset(),  # model/cogvlm.py's L2_PREFETCH
) -> dict[str, triton.Config]:
    """Pin, for each projection, the config of `configs` (default: kernels/gemv.py's GPU_CONFIGS)
    whose chain over `layers` replays fastest; returns them by projection name. An RMSNorm
    projection's shape without a residual (layer 0's qkv) takes the same config."""
    configs = list(gemv_module.GPU_CONFIGS if configs is None else configs)
    chosen = {}
    for projection in PROJECTIONS:
        weight0 = projection.weight(layers[0])
        (n_out, n_in), dtype = weight0.shape, weight0.dtype
        has_residual = projection.prologue == RMS_NORM  # the chain's calls carry one
        fn = chain(projection, layers, pdl, projection.name in early_trigger, projection.name in prefetch)
        times = {}
        for config in configs:
            gemv_module.pin(n_out, n_in, projection.prologue, has_residual, dtype, config)
            times[config] = timer(fn)
        best = min(configs, key=times.__getitem__)
        gemv_module.pin(n_out, n_in, projection.prologue, has_residual, dtype, best)
        if projection.prologue == RMS_NORM:
            gemv_module.pin(n_out, n_in, projection.prologue, False, dtype, best)
        chosen[projection.name] = best
    return chosen
