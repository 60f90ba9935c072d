"""The split-decode benchmark checks every shape it times against the reference (interpreter on
CPU), with the new row rotated and written in the launch as the engine calls it, and its check
catches a wrong kernel."""

import pytest
import torch

import kernels.paged_attention as attention_module
from benchmarks.kernels import bench_decode_attention as bench


@pytest.fixture
def shipped_shape_restored(monkeypatch):
    for name in ("SPLIT_TILE", "SPLIT_WARPS", "MAX_SPLITS"):
        monkeypatch.setattr(attention_module, name, getattr(attention_module, name))


@pytest.mark.parametrize("shape", [bench.shapes()[0], (64, 8, 32)])
def test_each_shape_is_checked_against_the_reference(shipped_shape_restored, shape):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = bench.layer_inputs(4, 2, 71, 1, device, torch.float32)
    bench.set_shape(shape)
    assert shape == (attention_module.SPLIT_TILE, attention_module.SPLIT_WARPS, attention_module.MAX_SPLITS)
    assert bench.max_error(*inputs[0]) <= 2.0


def test_the_check_catches_a_wrong_kernel(monkeypatch):
    inputs = bench.layer_inputs(4, 2, 71, 1, "cpu", torch.float32)
    monkeypatch.setattr(bench, "paged_attention", lambda q, *args, **kw: torch.zeros_like(q).flatten(1))
    assert bench.max_error(*inputs[0]) > 100
