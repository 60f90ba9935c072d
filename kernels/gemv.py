"""One-row GEMV for a batch-1 decode step, with the small op before each projection fused in.

Why: at batch 1 a CogVLM-17B decode step reads 12.3 GiB of weights and does little else. On an
H200 (RESULTS.md, 2026-11-27) cuBLAS's one-row GEMVs reach 73% to 90% of copy bandwidth and
alone take 1.20x the HBM floor; the RMSNorms around them (65 launches, 0.14 ms a step), silu*up
(0.04 ms) and cuBLAS's split-K reduces (0.11 ms) come on top. Here each program streams
BLOCK_N whole weight rows once (no split-K, so no atomics: a row's sum is the same every run),
and the op before the projection runs in the prologue, on the input row each program reads
from L2 (8 to 44 KB against the 64 KB or more of weights a program streams):

    plain:          out = W @ x
    rms_norm:       h = x + residual (rounded as the eager add; program 0 writes it back),
                    out = W @ rms_norm(h)                  (RMSNorm as kernels/rms_norm.py rounds it)
    silu_and_mul:   x = [gate | up], the fused gate_up output,
                    out = W @ (silu(gate) * up)            (rounded as kernels/activation.py)

so a decoder layer's four projections take four launches where they took eight to ten: on an
H200, 106 us against 123 us for the ops + cuBLAS (RESULTS.md, eighth session).

With `pdl` each launch is a programmatic dependent launch (kernels/pdl.py): the first weight
tile loads while the kernel before drains, and the input is read only after the wait. With
`prefetch` each program also asks L2 for the rest of its weight rows before that wait (_launch).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.pdl import pdl_launch
from kernels.rms_norm import rms_norm_ref

PLAIN, RMS_NORM, SILU_AND_MUL = 0, 1, 2  # the prologue
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # no PTX there: the L2 prefetch is left out


def _config(bn: int, bk: int, warps: int, stages: int, ahead: int = 0) -> triton.Config:
    # STAGES reaches the K loop itself: Triton pipelines a loop without tl.dot only when told to
    # (tl.range's num_stages); the launch option alone left each weight tile loading only after
    # the one before had been used (checked in the TTGIR, Triton 3.6 and 3.7).
    # AHEAD: weight tiles issued right after the PDL wait, before the prologue (see the kernel).
    kwargs = {"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": stages, "AHEAD": ahead}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


# Timed on an H200 (benchmarks/kernels/bench_gemv.py, RESULTS.md, eighth session): each of these
# won, or came within 4%, on one of CogVLM-17B's four decode projections (89% to 95% of copy
# bandwidth at best). STAGES 1 (no pipelining, each thread's 16-byte loads of one tile in
# flight) won two of the four. Left out after the same run: (32, 512) with 8 warps, never within
# 4%, and TMA tiles (16 to 64 x 128, 5 to 8 stages), 4% to 2.1x slower than the best pointer tile
# on every shape; their device-side descriptor also raced under PDL (written before the wait into
# scratch memory the allocator had handed the kernel before too: an illegal instruction on the
# GPU). Each holds BLOCK_N x BLOCK_K / threads <= 64 fp32 partial sums a thread; small BLOCK_N
# keeps the 4096-row projections at 128 to 512 programs for 132 SMs.
GPU_CONFIGS = [
    _config(8, 1024, 4, 3),
    _config(16, 512, 4, 3),
    _config(32, 256, 4, 4),
    _config(8, 1024, 4, 1),
    _config(16, 512, 4, 1),
    # One weight tile more in flight while the RMSNorm prologue reduces its row (a chain of L2
    # loads and a reduction, during which the configs above have nothing else coming from HBM).
    # On an H200 (eleventh session) these won all four projections alone, by 0.1 to 0.5 us (down
    # 23.4 against 23.9 us), and took a 17B batch-1 step from 3.83 to 3.78 ms replayed (the same
    # run). Two tiles ahead (AHEAD=2) lost on every projection (dense 11.3 against 10.0 us).
    _config(8, 1024, 4, 1, ahead=1),
    _config(8, 1024, 4, 3, ahead=1),
    _config(16, 512, 4, 1, ahead=1),
]
# Candidates, tuned only with COGSERVE_GEMV_CANDIDATES=1 (bench_gemv.py times each alone; the
# GPU tests check each): a config joins GPU_CONFIGS once a decode step shows it winning.
# Tried and left out on an H200 (twelfth session; bench_gemv.py, us a projection in a 32-layer
# graph, and bench_decode.py, a 17B batch-1 step against the default in the same run):
# - persistent programs, 2 or 3 an SM looping over row blocks (one pipelined (row block, K tile)
#   loop, the RMSNorm row reduced once a program): alone they won the RMSNorm projections (qkv
#   26.2 against 26.8 us, gate_up 43.7 against 44.5) and lost down (24.1 against 23.1), but a
#   step with them on qkv and gate_up took 4.23 ms replayed against 3.73 to 3.78, and 3.86 when
#   the autotuner could choose them: in the layer's chain of different kernels they hold every
#   SM until their last row block, so nothing of the next kernel overlaps their tail;
# - 8 warps a program, (16, 1024) and (8, 2048): 0.4 to 5 us slower on every projection;
# - 4 rows a program, (4, 2048) and (4, 1024): tied dense, lost the other three by 2 to 5 us.
CANDIDATE_CONFIGS: list[triton.Config] = []
SAFE_CONFIG = _config(16, 128, 4, 2)  # the interpreter's and the tests' config


def _configs() -> list[triton.Config]:
    if _INTERPRETED or not torch.cuda.is_available():
        return [SAFE_CONFIG]  # NOTE: the interpreter cannot autotune over several configs
    if os.environ.get("COGSERVE_AUTOTUNE", "1") == "0":
        return [SAFE_CONFIG]
    return GPU_CONFIGS + (CANDIDATE_CONFIGS if os.environ.get("COGSERVE_GEMV_CANDIDATES") == "1" else [])


@triton.jit
def _residual_sum(x_ptr, residual_ptr, k, k_ok, HAS_RESIDUAL: tl.constexpr):
    x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + k, mask=k_ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like the eager add
    return x


@triton.jit
def _input_chunk(x_ptr, residual_ptr, norm_ptr, k, k_ok, K, inv_rms, PROLOGUE: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr):  # fmt: skip
    """[BK] of the projection's input, the prologue applied, rounded to the model dtype."""
    if PROLOGUE == 0:
        a = tl.load(x_ptr + k, mask=k_ok, other=0.0)
    elif PROLOGUE == 1:
        h = _residual_sum(x_ptr, residual_ptr, k, k_ok, HAS_RESIDUAL)
        weight = tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        a = (weight * (h.to(tl.float32) * inv_rms)).to(h.dtype)
    else:
        gate = tl.load(x_ptr + k, mask=k_ok, other=0.0)
        up = tl.load(x_ptr + K + k, mask=k_ok, other=0.0)
        g32 = gate.to(tl.float32)
        silu = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)
        a = (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    return a


# Weight tiles a program asks L2 for with `prefetch` (the first one included): 64 KB in bf16 for
# every config (BLOCK_N x BLOCK_K = 8192), all of a 4096-wide projection's rows. The resident
# programs (4 an SM, 528 on 132 SMs) then hold 33 MB in flight against 50 MB of L2; down's whole
# rows (176 KB a program at K = 11008) would not fit.
PREFETCH_TILES = tl.constexpr(4)  # a constexpr: Triton 3.6 reads no other globals in a kernel


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the 128-byte line at each pointer, without waiting for it: a hint that writes
    nothing and reads nothing into registers, so it may come before the PDL wait."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.autotune(configs=_configs(), key=["N", "K", "PROLOGUE", "HAS_RESIDUAL", "PREFETCH"])
@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, residual_ptr, residual_out_ptr, norm_ptr,
    N, K, stride_wn, eps,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, K_POW2: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent launch: wait before reading inputs
    EARLY_TRIGGER: tl.constexpr,  # PDL: let the next kernel launch right after the wait (see _launch)
    PREFETCH: tl.constexpr,  # ask L2 for this program's first PREFETCH_TILES weight tiles first (see _launch)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, AHEAD: tl.constexpr,
):  # fmt: skip
    """out[rows] = W[rows] @ prologue(x) for this program's BLOCK_N rows. AHEAD (0 to 2): weight
    tiles 1..AHEAD load right after the wait, so they stream from HBM while the prologue's row
    reduction runs; the K loop then starts at tile 1 + AHEAD."""
    pid = tl.program_id(0)
    n0 = pid * BLOCK_N
    rows = n0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]  # [BN, BK]
    # The first weight tile reads nothing an earlier kernel writes, so under PDL it loads while
    # the kernel before this one drains; everything after the wait may read that kernel's output.
    # NOTE: nothing before the wait may write global memory either: the kernel before may still
    # be reading a buffer the caching allocator has since handed to this launch.
    w = tl.load(w_ptrs, mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
    if PREFETCH:  # the next K tiles' lines, one a thread a tile (BLOCK_N x BLOCK_K / LINE = 128 lines)
        LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth  # elements in 128 bytes
        LINES: tl.constexpr = BLOCK_K // LINE if BLOCK_K > LINE else 1
        line_rows = tl.minimum(rows, N - 1).to(tl.int64) * stride_wn  # rows past N ask for the last one
        line_cols = tl.arange(0, LINES) * LINE
        for k0 in range(BLOCK_K, tl.minimum(K, PREFETCH_TILES * BLOCK_K), BLOCK_K):
            _prefetch_l2(w_ptr + line_rows[:, None] + tl.minimum(k0 + line_cols, K - 1)[None, :])  # [BN, LINES]
    if PDL:
        tl.extra.cuda.gdc_wait()
        if EARLY_TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
    if AHEAD >= 1:
        w1 = tl.load(w_ptrs + BLOCK_K, mask=row_ok[:, None] & (BLOCK_K + cols < K)[None, :], other=0.0)
    if AHEAD >= 2:
        w2 = tl.load(w_ptrs + 2 * BLOCK_K, mask=row_ok[:, None] & (2 * BLOCK_K + cols < K)[None, :], other=0.0)
    inv_rms = 1.0
    if PROLOGUE == 1:  # the row's mean square first, from one load of the whole row (one L2 latency)
        whole = tl.arange(0, K_POW2)
        h = _residual_sum(x_ptr, residual_ptr, whole, whole < K, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(residual_out_ptr + whole, h, mask=(whole < K) & (pid == 0))
        h32 = h.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(h32 * h32, axis=0) / K + eps)
    # NOTE: products accumulate per lane and reduce across lanes once, after the loop: a reduce
    # per tile would put warp shuffles between consecutive weight loads
    a = _input_chunk(x_ptr, residual_ptr, norm_ptr, cols, cols < K, K, inv_rms, PROLOGUE, HAS_RESIDUAL)
    acc = w.to(tl.float32) * a.to(tl.float32)[None, :]  # [BN, BK]
    if AHEAD >= 1:
        a = _input_chunk(x_ptr, residual_ptr, norm_ptr, BLOCK_K + cols, BLOCK_K + cols < K, K, inv_rms, PROLOGUE,
                         HAS_RESIDUAL)  # fmt: skip
        acc += w1.to(tl.float32) * a.to(tl.float32)[None, :]
    if AHEAD >= 2:
        a = _input_chunk(x_ptr, residual_ptr, norm_ptr, 2 * BLOCK_K + cols, 2 * BLOCK_K + cols < K, K, inv_rms,
                         PROLOGUE, HAS_RESIDUAL)  # fmt: skip
        acc += w2.to(tl.float32) * a.to(tl.float32)[None, :]
    for k0 in tl.range((1 + AHEAD) * BLOCK_K, K, BLOCK_K, num_stages=STAGES):  # STAGES - 1 tiles in flight ahead
        k = k0 + cols
        k_ok = k < K
        a = _input_chunk(x_ptr, residual_ptr, norm_ptr, k, k_ok, K, inv_rms, PROLOGUE, HAS_RESIDUAL)
        w = tl.load(w_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * a.to(tl.float32)[None, :]
    if PDL and not EARLY_TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start its own weight loads
    # rounded to the input's dtype first: an fp32 output holds what a model-dtype GEMM then .float() gives
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(x_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty), mask=row_ok)


# The JIT function under the autotuner, and the configs pinned per call shape: a pinned shape
# launches its config directly, without the autotuner. Why: the autotuner times each config alone,
# outside a graph, where the configs lie within about 1% of each other; which one it picked moved a
# 17B batch-1 step between 3.73 and 3.78 ms replayed in one H200 run at the same code (twelfth
# session), and in a graph chain of one projection the configs differ by up to 5 us a launch
# (bench_gemv.py). model/gemv_tuning.py times them in such a chain and pins the best.
_JIT = _gemv_kernel.fn
_pinned: dict[tuple, triton.Config] = {}  # (N, K, prologue, has residual, dtype) -> config


def pin(out_features: int, in_features: int, prologue: int, has_residual: bool, dtype: torch.dtype,
        config: triton.Config | None) -> None:  # fmt: skip
    """Launch this call shape with `config` from now on (None: through the autotuner again)."""
    key = (out_features, in_features, prologue, has_residual, dtype)
    if config is None:
        _pinned.pop(key, None)
    else:
        _pinned[key] = config


def pinned() -> dict[tuple, triton.Config]:
    """The pinned call shapes and their configs (a copy; pin() changes them)."""
    return dict(_pinned)


def unpin_all() -> None:
    _pinned.clear()


# Configs by card for CogVLM-17B's batch-1 call shapes, (N, K, prologue, has residual) -> config,
# bf16: what the engine pins at start (pin_tuned) in place of the autotuner's pick. Why: the
# autotuner's picks vary from run to run, and a step's time with them: on an H200 the same code
# read a 17B batch-1 step at 3.64 and 3.77 ms (3.61 and 3.75 replayed) in one run, with these
# picks and with others (RESULTS.md, nineteenth session). The slow picks ran dense with
# (32, 256): 128 programs for 132 SMs. Timing the configs in a graph chain of one projection
# (model/gemv_tuning.py) chose that one too, and its steps read 3.72 ms twice. Pinned, these read
# 3.60 to 3.64 ms in six steps of three later processes (1.16x to 1.18x the HBM floor). Each config is one
# of GPU_CONFIGS, which the GPU tests check; other cards and shapes keep the autotuner.
TUNED: dict[str, dict[tuple[int, int, int, bool], triton.Config]] = {
    "NVIDIA H200": {
        (12288, 4096, RMS_NORM, True): _config(8, 1024, 4, 1, ahead=1),  # qkv
        (12288, 4096, RMS_NORM, False): _config(32, 256, 4, 4),  # layer 0's qkv (no residual yet)
        (4096, 4096, PLAIN, False): _config(16, 512, 4, 3),  # dense
        (22016, 4096, RMS_NORM, True): _config(8, 1024, 4, 3, ahead=1),  # gate_up
        (4096, 11008, SILU_AND_MUL, False): _config(8, 1024, 4, 3, ahead=1),  # down
        (32000, 4096, RMS_NORM, True): _config(8, 1024, 4, 3, ahead=1),  # lm_head after the final norm
    },
}


def pin_tuned(device_name: str, dtype: torch.dtype) -> int:
    """Pin the call shapes TUNED holds for this card (torch.cuda.get_device_name()); bf16 only, the
    dtype they were timed in. Returns how many shapes it pinned."""
    table = TUNED.get(device_name, {}) if dtype == torch.bfloat16 else {}
    for (n, k, prologue, has_residual), config in table.items():
        pin(n, k, prologue, has_residual, dtype, config)
    return len(table)


def _launch(x, weight, prologue, residual=None, norm_weight=None, eps=0.0, pdl=False, early_trigger=False,
            out_dtype=None, prefetch=False):  # fmt: skip
    """early_trigger (with pdl): where this GEMV lets the next kernel launch: right after its own
    wait (True), or after its K loop (False). The next launch waits until every program of this
    one has started and said so, so early costs this one no SM slot; it lets the next kernel's
    programs sit resident with their first weight tile loaded while this one streams. On an H200
    (eleventh session) early on every GEMV cost a 17B step 0.21 ms (3.78 -> 3.99 ms replayed) and
    isolated chains of one projection gained 0.2 to 1.1 us a launch except qkv (+4 us), so the
    model chooses per projection (model/cogvlm.py, EARLY_TRIGGER).

    prefetch (CUDA): each program first asks L2 for its first PREFETCH_TILES weight tiles (all its
    rows at K = 4096; prefetch.global.L2), then streams them as usual. Under PDL that runs while
    the kernel before drains: after the split decode, whose 7 to 10 us a layer read little from
    HBM (RESULTS.md, twelfth session), the attention output projection's 32 MiB (17B) can be on
    their way to L2 before its input exists. The model chooses per projection (model/cogvlm.py,
    L2_PREFETCH). The interpreter runs no PTX: there the hint is left out."""
    if x.dim() != 2 or x.shape[0] != 1 or not x.is_contiguous():
        raise ValueError(f"gemv takes one contiguous row [1, K], got {tuple(x.shape)} (strides {x.stride()})")
    in_features = x.shape[1] // 2 if prologue == SILU_AND_MUL else x.shape[1]
    if weight.dim() != 2 or weight.shape[1] != in_features or weight.stride(1) != 1 or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [N, {in_features}] {x.dtype} with contiguous rows, "
                         f"got {tuple(weight.shape)} {weight.dtype} (strides {weight.stride()})")  # fmt: skip
    for name, t, shape in (("residual", residual, x.shape), ("norm weight", norm_weight, (in_features,))):
        if t is not None and (t.shape != shape or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {tuple(shape)}, got {tuple(t.shape)}")
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(f"residual must be {x.dtype} like x, got {residual.dtype}")
    out_features = weight.shape[0]
    out = torch.empty(1, out_features, dtype=out_dtype or x.dtype, device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else None
    pdl, launch = pdl_launch(pdl, x.device)

    # absent residual and norm arguments are never read: any tensor stands in
    def grid(meta):
        return (triton.cdiv(out_features, meta["BLOCK_N"]),)

    config = _pinned.get((out_features, in_features, prologue, residual is not None, x.dtype))
    kernel, config_args = (_gemv_kernel, {}) if config is None else (_JIT, config.all_kwargs())
    kernel[grid](
        x, weight, out, residual if residual is not None else x, residual_out if residual is not None else out,
        norm_weight if norm_weight is not None else x, out_features, in_features, weight.stride(0), eps,
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None,
        K_POW2=triton.next_power_of_2(in_features) if prologue == RMS_NORM else 1,  # one compile for the others
        PDL=pdl, EARLY_TRIGGER=pdl and early_trigger, PREFETCH=prefetch and not _INTERPRETED,
        **launch, **config_args,
    )  # fmt: skip
    return out, residual_out


def gemv(x: torch.Tensor, weight: torch.Tensor, pdl: bool = False, early_trigger: bool = False,
         prefetch: bool = False) -> torch.Tensor:  # fmt: skip
    """[1, K] @ [N, K]^T -> [1, N]"""
    return _launch(x, weight, PLAIN, pdl=pdl, early_trigger=early_trigger, prefetch=prefetch)[0]


def rms_norm_gemv(
    x: torch.Tensor,  # [1, K]
    residual: torch.Tensor | None,  # [1, K]: added to x first; None: x is the residual stream
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    pdl: bool = False,
    early_trigger: bool = False,
    out_dtype: torch.dtype | None = None,  # default x's; fp32: the logits, rounded to x's dtype first
    prefetch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # W @ rms_norm(x + residual) [1, N]; x + residual (None without)
    return _launch(x, weight, RMS_NORM, residual, norm_weight, eps, pdl, early_trigger, out_dtype, prefetch)


def silu_and_mul_gemv(gate_up: torch.Tensor, weight: torch.Tensor, pdl: bool = False,
                      early_trigger: bool = False, prefetch: bool = False) -> torch.Tensor:  # fmt: skip
    """[1, 2K] (gate | up), [N, K] -> [1, N]"""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [1, 2K], got {tuple(gate_up.shape)}")
    return _launch(gate_up, weight, SILU_AND_MUL, pdl=pdl, early_trigger=early_trigger, prefetch=prefetch)[0]


def rms_norm_gemv_ref(x, residual, norm_weight, eps, weight):
    """The unfused ops, as the model runs them without this kernel."""
    normed, summed = rms_norm_ref(x, norm_weight, eps, residual)
    return F.linear(normed, weight), summed


def silu_and_mul_gemv_ref(gate_up, weight):
    gate, up = gate_up.chunk(2, dim=1)
    return F.linear(F.silu(gate) * up, weight)
