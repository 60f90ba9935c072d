"""GPU experiment: can a split-K Triton GEMV beat cuBLAS at one row (a batch-1 decode step)?

Why: on an H200 the decode step's GEMVs alone take 1.20x the HBM floor (cuBLAS reaches 73% to
90% of copy bandwidth at one row; RESULTS.md), so the issue's 1.2x target for the whole step
needs GEMVs faster than cuBLAS. This measures a candidate on CogVLM-17B's four decode shapes
before anything in model/ depends on it. Each result is checked against torch first.

    python benchmarks/kernels/bench_gemv.py            # GPU
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_gemv.py --check   # CPU: correctness only
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.bench_decode import copy_bandwidth

# (name, out_features, in_features): the language expert's projections of CogVLM-17B
SHAPES = [("qkv", 12288, 4096), ("dense", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)]
CONFIGS = [
    (64, 256, 4, 4),
    (128, 128, 4, 4),
    (64, 128, 2, 4),
    (32, 256, 8, 4),
    (128, 256, 2, 8),
]  # BN, BK, SPLIT_K, warps


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    start = split * per_split
    for k0 in range(start, tl.minimum(start + per_split, K), BLOCK_K):
        k = k0 + cols
        k_ok = k < K
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)  # [BK]
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BN, BK]  # fmt: skip
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptr + rows, acc, mask=row_ok)
    else:
        tl.atomic_add(out_ptr + rows, acc, mask=row_ok)


def gemv(x: torch.Tensor, w: torch.Tensor, config) -> torch.Tensor:  # x [K], w [N, K] -> [N] fp32
    block_n, block_k, split_k, warps = config
    n, k = w.shape
    out = torch.zeros(n, dtype=torch.float32, device=w.device)
    _gemv_kernel[(triton.cdiv(n, block_n), split_k)](x, w, out, n, k, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                                     SPLIT_K=split_k, num_warps=warps)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="correctness on small shapes only (CPU interpreter)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.check:
        for n, k in [(200, 72), (64, 1000)]:
            x, w = torch.randn(k, device=device), torch.randn(n, k, device=device)
            for config in CONFIGS:
                torch.testing.assert_close(gemv(x, w, config), w @ x, rtol=1e-4, atol=1e-3)
        print("gemv matches torch on", len(CONFIGS), "configs")
        return
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; share = weight bytes / time / copy bandwidth")
    print("| proj | N x K | cuBLAS us | share | best Triton us | share | (BN, BK, SPLIT_K, warps) |")
    print("|---|---|---|---|---|---|---|")
    for name, n, k in SHAPES:
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        want = (x @ w.T).float()[0]
        cublas_us = triton.testing.do_bench(lambda: x @ w.T, return_mode="median") * 1e3  # noqa: B023
        best = None
        for config in CONFIGS:
            got = gemv(x[0], w, config)
            if not torch.allclose(got, want, rtol=2e-2, atol=2e-2):
                print(f"  {name} {config}: WRONG (max error {(got - want).abs().max().item():.3g})")
                continue
            us = triton.testing.do_bench(lambda: gemv(x[0], w, config), return_mode="median") * 1e3  # noqa: B023
            if best is None or us < best[0]:
                best = (us, config)
        cublas = f"{cublas_us:.1f} | {n * k * 2 / (cublas_us / 1e6) / bandwidth:.2f}"
        ours = "- | - | none correct" if best is None else \
            f"{best[0]:.1f} | {n * k * 2 / (best[0] / 1e6) / bandwidth:.2f} | {best[1]}"  # fmt: skip
        print(f"| {name} | {n} x {k} | {cublas} | {ours} |")


if __name__ == "__main__":
    main()
