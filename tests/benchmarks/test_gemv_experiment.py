"""The GEMV experiment's candidates compute a GEMV (interpreter on CPU, compiled with CUDA), so
a GPU session measures correct kernels only."""

from benchmarks.kernels.bench_gemv import check


def test_gemv_candidates_match_torch(capsys):
    check()
    assert "gemv matches torch" in capsys.readouterr().out
