"""GPU: the one-row decode GEMV (kernels/gemv.py) against cuBLAS on CogVLM-17B's decode projections.

Why: on an H200 a batch-1 decode step's cuBLAS GEMVs alone take 1.20x the HBM floor (73% to 90%
of copy bandwidth; RESULTS.md), so the issue's 1.2x target for the whole step needs GEMVs at
cuBLAS's speed or better with the small ops before them fused in. Per projection, what the
layer runs before it today, and the fused kernel that replaces both:

    qkv      RMSNorm + residual, GEMV   ->  rms_norm_gemv
    dense    GEMV                       ->  gemv
    gate_up  RMSNorm + residual, GEMV   ->  rms_norm_gemv
    down     silu * up, GEMV            ->  silu_and_mul_gemv

Timing as in a decode step: every variant runs over 32 different weight matrices (one per
layer, so L2 never holds the next one) inside one CUDA graph (no launch gaps), replay time / 32.
Each config of kernels/gemv.py (candidates included) is timed alone (the autotuner picks the best of them), with
programmatic dependent launch (each GEMV loads its first weight tile while the one before
drains), and the best one again without it.

    python benchmarks/kernels/bench_gemv.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import kernels.gemv as gemv_module
from benchmarks.bench_decode import copy_bandwidth
from kernels.activation import silu_and_mul
from kernels.gemv import CANDIDATE_CONFIGS, GPU_CONFIGS, gemv, rms_norm_gemv, silu_and_mul_gemv
from kernels.rms_norm import rms_norm
from model.gemv_tuning import graph_ms

# (name, out_features, in_features, the op before it): the language expert's projections of CogVLM-17B
SHAPES = [("qkv", 12288, 4096, "rms_norm"), ("dense", 4096, 4096, None), ("gate_up", 22016, 4096, "rms_norm"),
          ("down", 4096, 11008, "silu_and_mul")]  # fmt: skip
LAYERS = 32
EPS = 1e-5


def per_layer_us(fn) -> float:
    """fn() runs all LAYERS projections; captured once, replayed: microseconds per projection."""
    return graph_ms(fn, warmup=10, rep=100) * 1e3 / LAYERS


def variants(n: int, k: int, op: str | None, dev: str = "cuda", dt: torch.dtype = torch.bfloat16):
    """(cuBLAS alone, the op + cuBLAS, ours) as functions of one [n, k] weight, and the row the
    op hands the projection (both paths round it alike)."""
    x = torch.randn(1, 2 * k if op == "silu_and_mul" else k, device=dev, dtype=dt)
    residual, norm = torch.randn(1, k, device=dev, dtype=dt), torch.rand(k, device=dev, dtype=dt) + 0.5
    plain = x[:, :k].contiguous()
    if op == "rms_norm":
        row = lambda: rms_norm(x, norm, EPS, residual)[0]  # noqa: E731
        ours = lambda w, pdl=True, early=False: rms_norm_gemv(x, residual, norm, EPS, w, pdl, early)[0]  # noqa: E731
    elif op == "silu_and_mul":
        row = lambda: silu_and_mul(x[:, :k], x[:, k:])  # noqa: E731
        ours = lambda w, pdl=True, early=False: silu_and_mul_gemv(x, w, pdl, early)  # noqa: E731
    else:
        row = lambda: plain  # noqa: E731
        ours = lambda w, pdl=True, early=False: gemv(plain, w, pdl, early)  # noqa: E731
    return (lambda w: F.linear(plain, w)), (lambda w: F.linear(row(), w)), ours, row


def correctly_rounded(out: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of outputs equal to the exact product rounded once to bf16: both paths accumulate in
    fp32 in different orders, and where they differ this says which one is nearer the exact."""
    return (out == exact.to(out.dtype)).float().mean().item()


def bench_shape(name: str, n: int, k: int, op: str | None) -> dict:
    """Times of cuBLAS, the op + cuBLAS, and each of our configs, in microseconds per projection."""
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    cublas, unfused, ours, prologue = variants(n, k, op)
    want = unfused(weights[0]).float()
    exact = prologue().double() @ weights[0].double().T  # [1, n]
    row = {"proj": name, "n": n, "k": k, "op": op, "configs": {}}
    row["cublas_rounded"] = correctly_rounded(unfused(weights[0]), exact)
    row["cublas"] = per_layer_us(lambda: [cublas(w) for w in weights])
    row["unfused"] = per_layer_us(lambda: [unfused(w) for w in weights])
    kernel = gemv_module._gemv_kernel
    all_configs = list(kernel.configs)
    for config in GPU_CONFIGS + CANDIDATE_CONFIGS:  # each alone; the candidates too
        kernel.configs, kernel.cache = [config], {}
        try:
            got = ours(weights[0]).float()
        except Exception as err:  # noqa: BLE001 -- a config that fails is reported, not fatal
            print(f"  {name} {config}: {type(err).__name__}: {str(err)[:150]}")
            continue
        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2):
            print(f"  {name} {config}: WRONG (max error {(got - want).abs().max().item():.3g})")
            continue
        row["configs"][str(config)] = per_layer_us(lambda: [ours(w) for w in weights])
    row["best"] = min(row["configs"], key=row["configs"].get) if row["configs"] else None
    row["ours"] = row["configs"].get(row["best"])
    row["ours_no_pdl"] = row["ours_early"] = row["ours_rounded"] = None
    if row["best"] is not None:  # the best config again, launched without PDL (each GEMV waits for the last)
        kernel.configs, kernel.cache = [c for c in GPU_CONFIGS + CANDIDATE_CONFIGS if str(c) == row["best"]], {}
        row["ours_no_pdl"] = per_layer_us(lambda: [ours(w, pdl=False) for w in weights])
        row["ours_rounded"] = correctly_rounded(ours(weights[0]), exact)
        # and with the next GEMV launched right after each one's wait
        row["ours_early"] = per_layer_us(lambda: [ours(w, early=True) for w in weights])
    kernel.configs, kernel.cache = all_configs, {}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    torch.cuda.empty_cache()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; share = weight bytes / time / copy bandwidth")
    print(f"per projection inside one CUDA graph over {LAYERS} weight matrices, bf16, one row")
    rows = []
    for name, n, k, op in SHAPES:
        rows.append(bench_shape(name, n, k, op))
        torch.cuda.empty_cache()
        share = lambda us: n * k * 2 / (us / 1e6) / bandwidth  # noqa: E731, B023
        for config, us in sorted(rows[-1]["configs"].items(), key=lambda item: item[1]):
            print(f"  {name} {config}: {us:.1f} us ({share(us):.2f})")
    print("\n| proj | N x K | op before | cuBLAS us | share | op + cuBLAS us | ours us | share | vs op + cuBLAS "
          "| ours without PDL us | ours, early trigger us | correctly rounded: cuBLAS, ours |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    unfused_total = ours_total = 0.0
    for r in rows:
        share = lambda us, r=r: r["n"] * r["k"] * 2 / (us / 1e6) / bandwidth  # noqa: E731
        ours = f"{r['ours']:.1f} | {share(r['ours']):.2f} | {r['ours'] / r['unfused']:.2f}x" if r["ours"] else "-|-|-"
        no_pdl, rounded = r["ours_no_pdl"] or float("nan"), r["ours_rounded"] or float("nan")
        early = r["ours_early"] or float("nan")
        print(f"| {r['proj']} | {r['n']} x {r['k']} | {r['op'] or '-'} | {r['cublas']:.1f} | "
              f"{share(r['cublas']):.2f} | {r['unfused']:.1f} | {ours} | {no_pdl:.1f} | {early:.1f} | "
              f"{r['cublas_rounded']:.3f}, {rounded:.3f} |")  # fmt: skip
        unfused_total += r["unfused"]
        ours_total += r["ours"] or float("nan")
    print(f"a layer's four projections: op + cuBLAS {unfused_total:.1f} us, ours {ours_total:.1f} us "
          f"({ours_total / unfused_total:.2f}x); a step ({LAYERS} layers): {unfused_total * LAYERS / 1e3:.2f} ms "
          f"-> {ours_total * LAYERS / 1e3:.2f} ms")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bandwidth, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
