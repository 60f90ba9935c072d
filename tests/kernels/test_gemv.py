"""The one-row decode GEMV and its fused prologues against a float64 oracle (interpreter on CPU,
compiled with CUDA). Tolerance as for every kernel here: at most 2x plain torch's error in the
same dtype (torch: the unfused ops the model runs without this kernel)."""

import pytest
import torch

import kernels.gemv as gemv_module
from kernels.gemv import (
    CANDIDATE_CONFIGS,
    GPU_CONFIGS,
    SAFE_CONFIG,
    gemv,
    rms_norm_gemv,
    rms_norm_gemv_ref,
    silu_and_mul_gemv,
    silu_and_mul_gemv_ref,
)
from tests.kernels.error_bound import DEVICE, DTYPES, check_close

SHAPES = [(200, 72), (33, 1000), (130, 256)]  # (N, K): K past a tile edge, one tile, whole tiles


def inputs(n, k, dtype, width=None):
    x = (torch.randn(1, width or k) * 2).to(DEVICE, dtype)
    w = (torch.randn(n, k) / k**0.5).to(DEVICE, dtype)
    return x, w


def f64(*tensors):
    return [None if t is None else t.double() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k", SHAPES)
def test_plain_gemv(dtype, n, k):
    x, w = inputs(n, k, dtype)
    out = gemv(x, w)
    check_close(out, x.double() @ w.double().T, x @ w.T)
    assert torch.equal(gemv(x, w, pdl=True), out)  # PDL changes when, never what (and is off without sm_90)
    # the L2 hint (GPU only) changes neither: odd N and K ask for clamped lines, never past the weight
    assert torch.equal(gemv(x, w, pdl=True, prefetch=True), out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "first-layer"])
def test_rms_norm_prologue(dtype, n, k, with_residual):
    """W @ rms_norm(x + residual), and x + residual rounded exactly as the eager add."""
    x, w = inputs(n, k, dtype)
    residual = torch.randn(1, k).to(DEVICE, dtype) if with_residual else None
    norm_weight = (1 + torch.randn(k) * 0.2).to(DEVICE, dtype)
    out, summed = rms_norm_gemv(x, residual, norm_weight, 1e-5, w)
    want, want_sum = rms_norm_gemv_ref(x, residual, norm_weight, 1e-5, w)
    exact, _ = rms_norm_gemv_ref(*f64(x, residual), norm_weight.double(), 1e-5, w.double())
    check_close(out, exact, want)
    if with_residual:
        assert torch.equal(summed, want_sum)
    else:
        assert summed is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k", SHAPES)
def test_silu_and_mul_prologue(dtype, n, k):
    gate_up, w = inputs(n, k, dtype, width=2 * k)
    exact = silu_and_mul_gemv_ref(gate_up.double(), w.double())
    check_close(silu_and_mul_gemv(gate_up, w), exact, silu_and_mul_gemv_ref(gate_up, w))


def test_rejects_what_it_cannot_run():
    x, w = inputs(64, 32, torch.float32)
    with pytest.raises(ValueError, match="one contiguous row"):
        gemv(torch.cat([x, x]), w)  # two rows
    with pytest.raises(ValueError, match="one contiguous row"):
        rms_norm_gemv(x[0], None, torch.ones(32, device=DEVICE), 1e-5, w)  # a vector, not a row
    with pytest.raises(ValueError, match="one contiguous row"):
        gemv(torch.randn(1, 64, device=DEVICE)[:, ::2], w)
    with pytest.raises(ValueError, match=r"weight must be \[N, 32\]"):
        gemv(x, w[:, :16])
    with pytest.raises(ValueError, match="weight"):
        gemv(x, w.half())
    with pytest.raises(ValueError, match="norm weight"):
        rms_norm_gemv(x, None, torch.ones(31, device=DEVICE), 1e-5, w)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_gemv(x, x.half(), torch.ones(32, device=DEVICE), 1e-5, w)
    with pytest.raises(ValueError, match="gate_up"):
        silu_and_mul_gemv(torch.randn(1, 63, device=DEVICE), w)


def check_every_prologue(config, shapes, dtype):
    """Under `config` alone: the plain, RMSNorm and silu-and-mul GEMVs each within the error bound."""
    kernel = gemv_module._gemv_kernel
    kernel.configs, kernel.cache = [config], {}
    for n, k in shapes:
        x, w = inputs(n, k, dtype)
        out = gemv(x, w)
        exact = x.double() @ w.double().T
        check_close(out, exact, x @ w.T)
        # the L2 hint in this config's tile shape; compiled with it, fp32's sums may round apart
        # from out's (the H200 run, nineteenth session), so it meets the same bound, not out's bits
        check_close(gemv(x, w, prefetch=True), exact, x @ w.T)
        residual, norm_weight = torch.randn_like(x), torch.rand(k, device=DEVICE, dtype=dtype)
        out, _ = rms_norm_gemv(x, residual, norm_weight, 1e-5, w)
        exact, _ = rms_norm_gemv_ref(*f64(x, residual, norm_weight), 1e-5, w.double())
        check_close(out, exact, rms_norm_gemv_ref(x, residual, norm_weight, 1e-5, w)[0])
        gate_up = torch.randn(1, 2 * k, device=DEVICE, dtype=dtype)
        exact = silu_and_mul_gemv_ref(gate_up.double(), w.double())
        check_close(silu_and_mul_gemv(gate_up, w), exact, silu_and_mul_gemv_ref(gate_up, w))


@pytest.mark.gpu
@pytest.mark.parametrize("config", GPU_CONFIGS + CANDIDATE_CONFIGS, ids=str)
def test_every_gpu_config_is_correct(monkeypatch, config):
    """The autotuner may pick any config; each must compute the same function, every prologue:
    K past a K tile, K past the tiles a config loads ahead of its loop, and many row blocks
    (20000 rows: 625 to 2500 blocks, several waves)."""
    kernel = gemv_module._gemv_kernel
    monkeypatch.setattr(kernel, "configs", kernel.configs)
    monkeypatch.setattr(kernel, "cache", {})
    check_every_prologue(config, [(300, 1000), (300, 3000), (20000, 1000)], torch.bfloat16)


@pytest.mark.parametrize("ahead", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiles_loaded_ahead_of_the_loop(monkeypatch, ahead, dtype):
    """AHEAD weight tiles load before the prologue and the loop starts after them: with K inside
    those tiles (72: the first one, partly; 200: two, the second partly) and past them (700)."""
    kernel = gemv_module._gemv_kernel
    monkeypatch.setattr(kernel, "configs", kernel.configs)
    monkeypatch.setattr(kernel, "cache", {})
    config = type(SAFE_CONFIG)({**SAFE_CONFIG.kwargs, "AHEAD": ahead}, num_warps=4, num_stages=2)
    check_every_prologue(config, [(40, 72), (40, 200), (40, 700)], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("early_trigger", [False, True], ids=["trigger-after-loop", "trigger-after-wait"])
def test_dependent_chain_under_pdl_matches_waiting_launches(early_trigger):
    """Each GEMV reads the one before's output: under programmatic dependent launch a read before
    the wait would race. A chain of 24, eager and replayed from a CUDA graph, must equal the
    same chain launched without PDL, bit for bit (one config: the tests' SAFE_CONFIG), wherever
    the GEMV lets the next one launch (early_trigger)."""
    k = 1024
    weights = [(torch.randn(k, k, device=DEVICE) / k**0.5).to(torch.bfloat16) for _ in range(3)]
    norm = torch.rand(k, device=DEVICE, dtype=torch.bfloat16) + 0.5

    def chain(x, pdl):
        residual = None
        for i in range(8):
            early = pdl and early_trigger
            h, residual = rms_norm_gemv(x, residual, norm, 1e-5, weights[0], pdl, early)  # reads x and the last sum
            if residual is None:
                residual = x
            x = gemv(h, weights[1], pdl, early, prefetch=pdl)  # its weights asked of L2 before the wait
            x = silu_and_mul_gemv(torch.cat([x, h], dim=1), weights[2], pdl, early) if i % 2 else x
        return x, residual

    x0 = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
    want = chain(x0, pdl=False)
    for _ in range(3):
        got = chain(x0, pdl=True)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain(x0, pdl=True)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(g, w) for g, w in zip(captured, want, strict=True))


def test_a_pinned_shape_launches_its_config_without_the_autotuner(monkeypatch):
    """kernels/gemv.py pin: that call shape launches the pinned config directly (every row block
    of it, 300 rows in blocks of 32), other shapes and an unpinned one go through the autotuner."""
    kernel = gemv_module._gemv_kernel
    monkeypatch.setattr(gemv_module, "_pinned", {})
    tuned, launched = [], []
    autotuner_run, jit_run = kernel.run, gemv_module._JIT.run
    monkeypatch.setattr(kernel, "run", lambda *a, **k: tuned.append(1) or autotuner_run(*a, **k))
    monkeypatch.setattr(gemv_module._JIT, "run", lambda *a, **k: launched.append(k.get("BLOCK_N")) or jit_run(*a, **k))
    config = type(SAFE_CONFIG)({**SAFE_CONFIG.kwargs, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=2)
    x, w = inputs(300, 200, torch.float32)
    norm_weight = (1 + torch.randn(200) * 0.2).to(DEVICE)
    gemv_module.pin(300, 200, gemv_module.RMS_NORM, False, torch.float32, config)
    out, _ = rms_norm_gemv(x, None, norm_weight, 1e-5, w)
    exact, _ = rms_norm_gemv_ref(*f64(x), None, norm_weight.double(), 1e-5, w.double())
    check_close(out, exact, rms_norm_gemv_ref(x, None, norm_weight, 1e-5, w)[0])
    assert not tuned and launched[-1] == 32
    rms_norm_gemv(x, torch.randn_like(x), norm_weight, 1e-5, w)  # with a residual: another shape
    gemv(x, w)
    assert len(tuned) == 2 and set(gemv_module.pinned()) == {(300, 200, gemv_module.RMS_NORM, False, torch.float32)}
    gemv_module.pin(300, 200, gemv_module.RMS_NORM, False, torch.float32, None)
    rms_norm_gemv(x, None, norm_weight, 1e-5, w)
    assert len(tuned) == 3 and not gemv_module.pinned()


def test_an_fp32_output_holds_the_model_dtype_result():
    """out_dtype=float32 (the logits): the projection rounded to the input's dtype, then widened,
    as a GEMM in the model dtype followed by .float() gives it."""
    x, w = inputs(300, 200, torch.float16)
    residual, norm_weight = torch.randn_like(x), (1 + torch.randn(200) * 0.2).to(DEVICE, torch.float16)
    wide, _ = rms_norm_gemv(x, residual, norm_weight, 1e-5, w, out_dtype=torch.float32)
    narrow, _ = rms_norm_gemv(x, residual, norm_weight, 1e-5, w)
    assert wide.dtype == torch.float32 and torch.equal(wide, narrow.float())


def test_the_tuned_table_pins_its_card_shapes_only_in_bf16(monkeypatch):
    """pin_tuned pins each call shape of TUNED's entry for that card name with its config, and
    nothing for a card the table does not name or for a dtype other than bf16 (the one timed)."""
    monkeypatch.setattr(gemv_module, "_pinned", {})
    table = gemv_module.TUNED["NVIDIA H200"]
    assert gemv_module.pin_tuned("NVIDIA H200", torch.float16) == 0 and not gemv_module.pinned()
    assert gemv_module.pin_tuned("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 0 and not gemv_module.pinned()
    assert gemv_module.pin_tuned("NVIDIA H200", torch.bfloat16) == len(table) == 6
    assert gemv_module.pinned() == {(*shape, torch.bfloat16): config for shape, config in table.items()}


def test_every_tuned_config_is_a_gpu_config():
    """TUNED's configs are GPU_CONFIGS, which the GPU tests check one by one; its shapes are
    CogVLM-17B's batch-1 projections (qkv, dense, gate_up, down, lm_head)."""
    described = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["STAGES"], c.kwargs["AHEAD"], c.num_warps,
                  c.num_stages) for c in GPU_CONFIGS}  # fmt: skip
    for table in gemv_module.TUNED.values():
        for (n, k, _, _), c in table.items():
            assert (n, k) in {(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)}
            assert (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["STAGES"], c.kwargs["AHEAD"], c.num_warps,
                    c.num_stages) in described  # fmt: skip
