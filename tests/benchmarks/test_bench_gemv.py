"""The GEMV benchmark times what it says: for each projection, our fused kernel computes what
the op + cuBLAS path computes (interpreter on CPU), so a GPU run compares equal work."""

import pytest
import torch

from benchmarks.kernels.bench_gemv import SHAPES, correctly_rounded, variants


@pytest.mark.parametrize("op", sorted({op for *_, op in SHAPES}, key=str))
def test_fused_variant_computes_the_unfused_one(op):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cublas, unfused, ours, row = variants(96, 80, op, device, torch.float32)
    w = torch.randn(96, 80, device=device) / 9
    torch.testing.assert_close(ours(w), unfused(w), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(row() @ w.T, unfused(w))  # the row the accuracy column multiplies exactly
    if op is not None:  # the op changes the input: the plain GEMV differs (with none, both are one call)
        assert not torch.allclose(cublas(w), unfused(w), atol=1e-3)


def test_correctly_rounded_counts_outputs_at_the_rounded_exact_value():
    exact = torch.tensor([[1.0, 1.0 + 2**-9, 3.0, -2.0]], dtype=torch.float64)  # 1 + 2^-9 rounds to 1 in bf16
    out = torch.tensor([[1.0, 1.0, 3.015625, -2.0]], dtype=torch.bfloat16)  # the third one ulp off
    assert correctly_rounded(out, exact) == 0.75
