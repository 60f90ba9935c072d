"""The routed expert kernels against a float64 oracle. On CPU they run in the Triton
interpreter (fp32, fp16); with CUDA the same tests run compiled, bf16 included.

Tolerance (flash-attention's rule): the kernel's error against the float64 reference is at
most 2x the error of plain torch (gather -> two GEMMs -> scatter) in the same dtype."""

import pytest
import torch

import kernels.expert_linear as kernel_module
from kernels.arrivals import arrival_counts
from kernels.expert_linear import (
    CANDIDATE_CONFIGS,
    GPU_CONFIGS,
    SAFE_SK_CONFIG,
    expert_gated_up,
    expert_gated_up_ref,
    expert_linear,
    expert_linear_ref,
    fits,
)
from kernels.expert_routing import ALIGN_M, route_by_expert, tuning_bucket, tuning_row_counts
from tests.kernels.error_bound import DEVICE, DTYPES, check_close


def pattern(name: str, n: int) -> torch.Tensor:
    idx = torch.arange(n)
    if name == "all_text":
        mask = torch.zeros(n, dtype=torch.bool)
    elif name == "all_vision":
        mask = torch.ones(n, dtype=torch.bool)
    elif name == "alternating":
        mask = idx % 2 == 1
    elif name == "long_run":  # one image run crossing several tile boundaries, text on both sides
        mask = (idx >= n // 7) & (idx < n - n // 5)
    elif name == "run_to_end":  # an image run ending at the last row
        mask = idx >= n // 3
    elif name == "two_runs":  # two images: sorted tiles of 64 straddle them, and end past the last
        mask = ((idx >= n // 13) & (idx < n // 3)) | ((idx >= n // 2) & (idx < n - 3))
    elif name == "random":
        mask = torch.rand(n) < 0.5
    else:
        raise ValueError(name)
    return mask.to(DEVICE)


def weights(n_out, n_in, dtype, bias_on=()):
    def w():
        return (torch.randn(n_out, n_in, device=DEVICE) / n_in**0.5).to(dtype)

    def b(expert):
        return torch.randn(n_out, device=DEVICE).to(dtype) if expert in bias_on else None

    return w(), w(), b("language"), b("vision")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [1, 7, 130, 1300])
@pytest.mark.parametrize("mask_name", ["all_text", "all_vision", "alternating", "long_run", "run_to_end", "random"])
def test_expert_linear_matches_reference(dtype, num_tokens, mask_name):
    n_in, n_out = 72, 200
    x = torch.randn(num_tokens, n_in, device=DEVICE).to(dtype)
    mask = pattern(mask_name, num_tokens)
    w_lang, w_vis, _, b_vis = weights(n_out, n_in, dtype, bias_on=("vision",))
    out = expert_linear(x, mask, w_lang, w_vis, None, b_vis)
    ref64 = expert_linear_ref(x.double(), mask, w_lang.double(), w_vis.double(), None, b_vis.double())
    check_close(out, ref64, expert_linear_ref(x, mask, w_lang, w_vis, None, b_vis))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_on", [(), ("language",), ("vision",), ("language", "vision")], ids=str)
def test_bias_on_one_expert_only(dtype, bias_on):
    x = torch.randn(300, 96, device=DEVICE).to(dtype)
    mask = pattern("long_run", 300)
    w_lang, w_vis, b_lang, b_vis = weights(130, 96, dtype, bias_on)
    out = expert_linear(x, mask, w_lang, w_vis, b_lang, b_vis)
    f64 = [t.double() if t is not None else None for t in (x, w_lang, w_vis, b_lang, b_vis)]
    ref64 = expert_linear_ref(f64[0], mask, *f64[1:])
    check_close(out, ref64, expert_linear_ref(x, mask, w_lang, w_vis, b_lang, b_vis))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [1, 130, 1300])
@pytest.mark.parametrize("mask_name", ["all_text", "long_run", "alternating"])
def test_gated_up_matches_reference(dtype, num_tokens, mask_name):
    n_in, inter = 72, 200
    x = torch.randn(num_tokens, n_in, device=DEVICE).to(dtype)
    mask = pattern(mask_name, num_tokens)
    gl, ul, _, _ = weights(inter, n_in, dtype)
    gv, uv, _, _ = weights(inter, n_in, dtype)
    out = expert_gated_up(x, mask, gl, ul, gv, uv)
    ref64 = expert_gated_up_ref(x.double(), mask, gl.double(), ul.double(), gv.double(), uv.double())
    check_close(out, ref64, expert_gated_up_ref(x, mask, gl, ul, gv, uv))


@pytest.mark.parametrize("max_tma", [0, 1, 2])
@pytest.mark.parametrize("mask_name", ["long_run", "two_runs", "alternating", "run_to_end"])
@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gated"])
def test_every_tma_level_matches_reference(monkeypatch, max_tma, mask_name, gated):
    """Level 2 loads a tile's rows as one run when they are one (long_run, the full tiles of
    two_runs), gathers them otherwise (alternating, the tiles straddling two_runs' gap); a
    wrong run test would read neighbouring rows."""
    monkeypatch.setattr(kernel_module, "MAX_TMA", max_tma)
    dtype = torch.float16
    x = torch.randn(300, 96, device=DEVICE).to(dtype)
    mask = pattern(mask_name, 300)
    if gated:
        gl, ul, gv, uv = (weights(136, 96, dtype)[0] for _ in range(4))
        out = expert_gated_up(x, mask, gl, ul, gv, uv)
        ref64 = expert_gated_up_ref(x.double(), mask, gl.double(), ul.double(), gv.double(), uv.double())
        check_close(out, ref64, expert_gated_up_ref(x, mask, gl, ul, gv, uv))
    else:
        w_lang, w_vis, b_lang, b_vis = weights(136, 96, dtype, bias_on=("language",))
        out = expert_linear(x, mask, w_lang, w_vis, b_lang, b_vis)
        f64 = [t.double() if t is not None else None for t in (x, w_lang, w_vis, b_lang, b_vis)]
        ref64 = expert_linear_ref(f64[0], mask, *f64[1:])
        check_close(out, ref64, expert_linear_ref(x, mask, w_lang, w_vis, b_lang, b_vis))


def test_tma_limit_follows_alignment(monkeypatch):
    """TMA needs unit inner strides and 16-byte aligned bases and row strides; else pointer loads."""
    monkeypatch.setattr(kernel_module, "MAX_TMA", 2)
    x = torch.randn(10, 64, device=DEVICE, dtype=torch.float16)
    w = torch.randn(32, 64, device=DEVICE, dtype=torch.float16)
    level = 0 if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9 else 2
    assert kernel_module.tma_limit(x, [w, w]) == level
    assert kernel_module.tma_limit(x[:, 1:], [w[:, 1:], w[:, 1:]]) == 0  # misaligned weights
    assert kernel_module.tma_limit(x[:, 1:], [w, w]) == min(level, 1)  # misaligned base of x
    assert kernel_module.tma_limit(x[:, ::2], [w, w]) == min(level, 1)  # x strided along K
    assert kernel_module.tma_limit(torch.randn(10, 60, device=DEVICE, dtype=torch.float16), [w, w]) == min(level, 1)
    monkeypatch.setattr(kernel_module, "MAX_TMA", 0)
    assert kernel_module.tma_limit(x, [w, w]) == 0


@pytest.mark.parametrize(
    "programs, num_tokens, n_out, mask_name, n_in",
    [
        # 12 tiles of 64 x 64 on 5 programs: 10 whole; the tail's 2 tiles x 3 K tiles dealt 2 a
        # program: 2 parts a tile, one share spanning both tiles
        (5, 300, 96, "long_run", 72),
        (8, 300, 96, "two_runs", 72),  # 4 tail tiles in 2 parts; the tail tiles straddle the image gap
        (7, 300, 96, "long_run", 72),  # 5 tail tiles on 7 programs, 3 K iterations a share: each tile in one share
        # the same with 4 K tiles: 3 a share, 2 parts a tile, shares spanning two tiles (a tail of
        # more than half the programs, which ran as a whole wave before the thirteenth session)
        (7, 300, 96, "long_run", 128),
        (6, 300, 96, "alternating", 72),  # 12 tiles on 6: no tail
        (16, 100, 40, "random", 72),  # 2 tiles on 16: all tail, one K iteration a share, 3 parts a tile, 10 idle
    ],
)
@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gated"])
def test_stream_k_tail_matches_reference(monkeypatch, programs, num_tokens, n_out, mask_name, n_in, gated):
    """SK = 1: whole tiles round-robin over the programs, the last partial wave's K iterations
    dealt out evenly, the last part of each tile adding all parts. Same function as the
    reference, the same bits every run, and the arrival counts back at zero."""
    monkeypatch.setattr(kernel_module, "SK_PROGRAMS", programs)
    kernel = kernel_module._expert_linear_kernel
    monkeypatch.setattr(kernel, "configs", [SAFE_SK_CONFIG])
    monkeypatch.setattr(kernel, "cache", {})
    dtype = torch.float16
    x = torch.randn(num_tokens, n_in, device=DEVICE).to(dtype)  # K tiles of 32
    mask = pattern(mask_name, num_tokens)
    if gated:
        gl, ul, gv, uv = (weights(n_out, n_in, dtype)[0] for _ in range(4))
        out = expert_gated_up(x, mask, gl, ul, gv, uv)
        again = expert_gated_up(x, mask, gl, ul, gv, uv)
        ref64 = expert_gated_up_ref(x.double(), mask, gl.double(), ul.double(), gv.double(), uv.double())
        check_close(out, ref64, expert_gated_up_ref(x, mask, gl, ul, gv, uv))
    else:
        w_lang, w_vis, b_lang, b_vis = weights(n_out, n_in, dtype, bias_on=("vision",))
        out = expert_linear(x, mask, w_lang, w_vis, b_lang, b_vis)
        again = expert_linear(x, mask, w_lang, w_vis, b_lang, b_vis)
        f64 = [t.double() if t is not None else None for t in (x, w_lang, w_vis, b_lang, b_vis)]
        check_close(out, expert_linear_ref(f64[0], mask, *f64[1:]), expert_linear_ref(x, mask, w_lang, w_vis, b_lang,
                                                                                       b_vis))  # fmt: skip
    assert torch.equal(out, again)
    assert not arrival_counts(x.device, programs).any()


@pytest.mark.parametrize("max_tma", [0, 1])
@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gated"])
def test_stream_k_below_the_top_tma_level(monkeypatch, max_tma, gated):
    """A stream-K program builds what it reads the weights through once (pointers at level 0,
    both experts' descriptors at 1) and each tile, whole or a tail part, selects its expert's; the
    tiles of two_runs on 8 programs take both experts in one program."""
    monkeypatch.setattr(kernel_module, "MAX_TMA", max_tma)
    monkeypatch.setattr(kernel_module, "SK_PROGRAMS", 8)
    kernel = kernel_module._expert_linear_kernel
    monkeypatch.setattr(kernel, "configs", [SAFE_SK_CONFIG])
    monkeypatch.setattr(kernel, "cache", {})
    dtype = torch.float16
    x = torch.randn(300, 72, device=DEVICE).to(dtype)
    mask = pattern("two_runs", 300)
    if gated:
        gl, ul, gv, uv = (weights(96, 72, dtype)[0] for _ in range(4))
        ref64 = expert_gated_up_ref(x.double(), mask, gl.double(), ul.double(), gv.double(), uv.double())
        check_close(expert_gated_up(x, mask, gl, ul, gv, uv), ref64, expert_gated_up_ref(x, mask, gl, ul, gv, uv))
    else:
        w_lang, w_vis, _, b_vis = weights(96, 72, dtype, bias_on=("vision",))
        ref64 = expert_linear_ref(x.double(), mask, w_lang.double(), w_vis.double(), None, b_vis.double())
        check_close(expert_linear(x, mask, w_lang, w_vis, None, b_vis), ref64,
                    expert_linear_ref(x, mask, w_lang, w_vis, None, b_vis))  # fmt: skip
    assert not arrival_counts(x.device, 8).any()


def test_rows_go_to_their_own_expert_exactly_once():
    """Identity-like weights make routing errors visible as exact values: language doubles a
    row, vision triples it, so any row computed with the wrong expert (or twice) is off."""
    n = 300
    x = torch.randn(n, 32, device=DEVICE)
    mask = pattern("random", n)
    eye = torch.eye(32, device=DEVICE)
    out = expert_linear(x, mask, 2 * eye, 3 * eye)
    want = torch.where(mask[:, None], 3 * x, 2 * x)
    torch.testing.assert_close(out, want)


def test_non_contiguous_inputs_are_handled():
    base = torch.randn(64, 2 * 72, device=DEVICE)
    x = base[:, ::2]  # stride 2 along K
    mask = pattern("long_run", 64)
    w_lang, w_vis, _, _ = weights(72, 40, torch.float32)
    w_lang_t = w_lang.t()  # [40, 72] viewed transposed -> non-contiguous [out, in]
    w_vis_t = w_vis.t().contiguous()
    out = expert_linear(x, mask, w_lang_t, w_vis_t)
    torch.testing.assert_close(out, expert_linear_ref(x, mask, w_lang_t, w_vis_t), atol=1e-5, rtol=1e-5)


def test_shape_and_dtype_mismatches_are_refused():
    x = torch.randn(4, 8, device=DEVICE)
    mask = torch.zeros(4, dtype=torch.bool, device=DEVICE)
    w = torch.randn(6, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        expert_linear(x, mask, w, torch.randn(6, 9, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        expert_linear(x, mask, w, w.half())
    with pytest.raises(ValueError, match="bias"):
        expert_linear(x, mask, w, w, torch.randn(5, device=DEVICE))
    with pytest.raises(ValueError, match="vision_mask"):
        expert_linear(x, mask[:3], w, w)


def test_routing_groups_rows_per_expert_on_aligned_tiles():
    mask = pattern("long_run", 700)
    routing = route_by_expert(mask)
    rows = routing.sorted_rows.cpu()
    start = int(routing.vision_start)
    num_language = int((~mask).sum())
    assert start % ALIGN_M == 0 and num_language <= start < num_language + ALIGN_M
    assert rows[:num_language].tolist() == torch.nonzero(~mask.cpu()).flatten().tolist()
    assert rows[start : start + int(mask.sum())].tolist() == torch.nonzero(mask.cpu()).flatten().tolist()
    assert (rows[num_language:start] == -1).all() and (rows[start + int(mask.sum()) :] == -1).all()


def test_empty_batch():
    x = torch.randn(0, 8, device=DEVICE)
    w = torch.randn(6, 8, device=DEVICE)
    assert expert_linear(x, torch.zeros(0, dtype=torch.bool, device=DEVICE), w, w).shape == (0, 6)


@pytest.mark.gpu
def test_no_host_synchronisation_on_the_kernel_path():
    x = torch.randn(2000, 256, device="cuda", dtype=torch.bfloat16)
    mask = pattern("long_run", 2000)
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    expert_linear(x, mask, w, w)  # autotune and compile outside the check
    expert_gated_up(x, mask, w, w, w, w)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routing = route_by_expert(mask)
        expert_linear(x, mask, w, w, routing=routing)
        expert_gated_up(x, mask, w, w, w, w, routing=routing)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("config", [c for c in GPU_CONFIGS + CANDIDATE_CONFIGS if fits(c, 2, gated=False)], ids=str)
def test_every_gpu_config_is_correct(monkeypatch, config):
    """The autotuner may pick any config that fits a bf16 call (stream-K included, and the
    candidates with COGSERVE_EXPERT_CANDIDATES=1); each must compute the same function."""
    kernel = kernel_module._expert_linear_kernel
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})
    for n_in in (72, 256):  # K not a multiple of BLOCK_K, and one that is
        x = torch.randn(700, n_in, device=DEVICE, dtype=torch.bfloat16)
        mask = pattern("long_run", 700)
        w_lang, w_vis, b_lang, b_vis = weights(300, n_in, torch.bfloat16, bias_on=("vision",))
        f64 = [t.double() if t is not None else None for t in (x, w_lang, w_vis, b_lang, b_vis)]
        out = expert_linear(x, mask, w_lang, w_vis, b_lang, b_vis)
        check_close(
            out, expert_linear_ref(f64[0], mask, *f64[1:]), expert_linear_ref(x, mask, w_lang, w_vis, b_lang, b_vis)
        )
        if fits(config, 2, gated=True):
            gl, ul, gv, uv = (weights(300, n_in, torch.bfloat16)[0] for _ in range(4))
            got = expert_gated_up(x, mask, gl, ul, gv, uv)
            ref = expert_gated_up_ref(x.double(), mask, gl.double(), ul.double(), gv.double(), uv.double())
            check_close(got, ref, expert_gated_up_ref(x, mask, gl, ul, gv, uv))


@pytest.mark.parametrize("max_rows", [1, 255, 256, 257, 769, 2048, 5000])
def test_tuning_row_counts_cover_every_bucket_once(max_rows):
    """The engine tunes at these counts at start: every call of 1..max_rows rows must share an
    autotuning bucket with exactly one of them."""
    counts = tuning_row_counts(max_rows)
    buckets = [tuning_bucket(rows) for rows in counts]
    assert len(set(buckets)) == len(buckets) and max(counts) == max_rows
    assert {tuning_bucket(rows) for rows in range(1, max_rows + 1)} == set(buckets)
    # the bucket is the routed slot count's power of two: the kernel's grid never outgrows it
    assert all(tuning_bucket(rows) >= route_by_expert(torch.zeros(rows, dtype=torch.bool)).num_slots for rows in counts)


def test_the_default_token_budget_tunes_four_buckets():
    assert tuning_row_counts(2048) == [ALIGN_M, 3 * ALIGN_M, 7 * ALIGN_M, 2048]  # EngineConfig's comment


def test_a_tuned_key_skips_the_autotuner_and_launches_its_choice(monkeypatch):
    """After the autotuner has chosen a config for a key, later calls of that key launch the JIT
    function with it directly (the autotuner's per-call key costs host time), with the same
    result; a new key, new configs or a cleared cache go through the autotuner again."""
    kernel = kernel_module._expert_linear_kernel
    small = kernel_module.SAFE_CONFIG
    other = type(small)({**small.kwargs, "BLOCK_M": 32}, num_warps=4, num_stages=3)
    monkeypatch.setattr(kernel, "configs", [small, other])
    monkeypatch.setattr(kernel, "cache", {})
    # the interpreter cannot time configs: this tuner prefers `other`
    monkeypatch.setattr(kernel, "_bench", lambda *args, config, **kwargs: 1.0 if config is other else 2.0)
    tuned, launched = [], []  # calls through the autotuner; BLOCK_M of every launch
    autotuner_run, jit_run = kernel.run, kernel_module._JIT.run

    def through_autotuner(*args, **kwargs):
        tuned.append(1)
        return autotuner_run(*args, **kwargs)

    def launch(*args, **kwargs):
        launched.append(kwargs["BLOCK_M"])
        return jit_run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", through_autotuner)
    monkeypatch.setattr(kernel_module._JIT, "run", launch)

    x = torch.randn(130, 72, device=DEVICE)
    mask = pattern("long_run", 130)
    w_lang, w_vis, _, _ = weights(40, 72, torch.float32)
    want = expert_linear_ref(x.double(), mask, w_lang.double(), w_vis.double())
    first = expert_linear(x, mask, w_lang, w_vis)
    assert len(tuned) == 1 and launched[-1] == 32  # tuned: the autotuner ran its choice
    second = expert_linear(x, mask, w_lang, w_vis)
    assert len(tuned) == 1 and launched[-1] == 32  # the same choice, without the autotuner
    assert torch.equal(first, second)
    check_close(second, want, expert_linear_ref(x, mask, w_lang, w_vis))

    expert_linear(x, mask, *weights(24, 72, torch.float32)[:2])  # another output width: another key
    assert len(tuned) == 2
    kernel.cache.clear()  # as tests/kernels/hopper_compile.py does
    expert_linear(x, mask, w_lang, w_vis)
    assert len(tuned) == 3
    monkeypatch.setattr(kernel, "configs", [other, small])  # new configs: every choice is forgotten
    expert_linear(x, mask, w_lang, w_vis)
    assert len(tuned) == 4
