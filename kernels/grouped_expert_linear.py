"""The routed projection over rows already grouped by expert (the engine's --expert-rows grouped).

    out[s] = x[s] @ w_language.T + b_language    for s < vision_start
    out[s] = x[s] @ w_vision.T + b_vision        for s >= vision_start

x holds the batch in ExpertRouting's slot order (language rows, padding to a multiple of ALIGN_M,
vision rows, padding), as the model holds its hidden states from the embedding to the last layer
when asked to (CogVLMForCausalLM.use_grouped_expert_rows; attention reads rows back in order). Every
tile is then one TMA run of x, which is what Triton's Hopper warp specialisation needs: with
kernels/expert_linear.py's gathered tiles it partitions nothing (the NOTE there), while this loop
is partitioned under Triton 3.6 and 3.7 (a producer warpgroup, two consumers splitting the tile's
rows; 12 warps at num_warps=4, no spill), cuBLAS's Hopper layout. expert_linear reaches 600 to 680 TFLOP/s where
cuBLAS reaches 700 to 780 (nineteenth session). Untimed so far: benchmarks/kernels/bench_expert_linear.py
times this kernel beside both, and benchmarks/bench_expert_layers.py the layers either way, so a GPU
run says whether carrying the slot order through the model pays; until then the engine's default
keeps batch order.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.expert_linear import _expert_pick, _num_sms, _sk_tile, check_biases
from kernels.expert_routing import ALIGN_M, ExpertRouting, tuning_bucket
from kernels.tma import has_tma, set_tma_allocator, tma_ready


def _config(bm: int, bn: int, bk: int, warps: int, stages: int, ws: bool = True) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "WS": ws}, num_warps=warps, num_stages=stages)


# Autotuned on a GPU, per weight shape and row bucket. WS: the tile loop warp-specialised, which needs
# num_warps=4 (the producer; Triton adds two consumer warpgroups of 64 rows each; at 8 warps it
# partitions nothing). Each WS config compiles for sm_90 partitioned, with 168 registers a thread
# and no spill, under Triton 3.6 and 3.7 (tests/kernels/hopper_compile.py's stand-in, twenty-first
# session; shared memory in the comments). The gated tiles halve BLOCK_N for their second
# accumulator. The last of each list is the same persistent loop unpartitioned at 8 warps (175 to
# 218 registers, no spill): beside the others it says what the partitioning buys. All untimed;
# bench_expert_linear.py prints each shape's pick.
PLAIN_CONFIGS = [
    _config(128, 256, 64, 4, 3),  # 176 KB: the first choice (twentieth session)
    _config(128, 256, 64, 4, 4),  # 224 KB: one stage more in flight
    _config(256, 128, 64, 4, 3),  # 160 KB: each consumer 128 x 128
    # 144 KB: for one image's partial wave. 17B's dense there is 176 tiles of 128 x 256 on 132 SMs,
    # two tiles' time; 352 of 128 x 128 take three of theirs, 1.5 of the larger tile's
    _config(128, 128, 64, 4, 4),
    _config(128, 256, 64, 8, 3, ws=False),
]
GATED_CONFIGS = [
    _config(128, 128, 64, 4, 3),  # 160 KB
    _config(128, 128, 64, 4, 4),  # 208 KB
    _config(128, 64, 64, 4, 4),  # 144 KB: twice the tiles, for a one-image batch's partial wave
    _config(128, 128, 64, 8, 3, ws=False),
]
# The interpreter's tile, and fp32's on a GPU: IEEE fp32 has no wgmma, and the GPU tiles would
# spill 27 KB a thread there
SMALL_CONFIG = _config(64, 64, 32, 4, 3, ws=False)
GROUP_M = 8
# each expert's region starts on a multiple of ALIGN_M, so a tile never holds both experts
assert all(ALIGN_M % c.kwargs["BLOCK_M"] == 0 for c in PLAIN_CONFIGS + GATED_CONFIGS + [SMALL_CONFIG])


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return [SMALL_CONFIG]  # NOTE: the interpreter cannot autotune over several configs
    if os.environ.get("COGSERVE_AUTOTUNE", "1") == "0":
        return [PLAIN_CONFIGS[0], GATED_CONFIGS[0]]  # tests: the first choice of each variant
    return list(dict.fromkeys(PLAIN_CONFIGS + GATED_CONFIGS))  # (128, 128, 64, 4, 4) is in both


def _prune_configs(configs, named_args, **kwargs):
    """The variant's own list (plain or gated), in its order; fp32 takes the small tile."""
    if named_args["x_ptr"].dtype == torch.float32:
        return [SMALL_CONFIG]
    wanted = GATED_CONFIGS if kwargs["GATED"] else PLAIN_CONFIGS
    return [c for c in wanted if c in configs] or [SMALL_CONFIG]


@triton.autotune(
    configs=_configs(),
    key=["N", "K", "GATED", "M_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _grouped_expert_kernel(
    x_ptr, out_ptr, w_lang_ptr, w_vis_ptr, w2_lang_ptr, w2_vis_ptr, b_lang_ptr, b_vis_ptr,
    vision_start_ptr, num_language_ptr,
    num_rows, num_slots, N, K, stride_om, M_BUCKET,  # M_BUCKET: autotune key only
    HAS_BIAS_LANG: tl.constexpr, HAS_BIAS_VIS: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """One program an SM over the [BLOCK_M, BLOCK_N] tiles that hold rows (the language row tiles,
    then the vision ones, none of the padding between), each through its expert's weights:
    acc = x[slots] @ W_e[n_block].T (and acc2 with W2_e when GATED), finished as expert_linear's
    epilogue finishes it (+ b_e, or silu(acc) * acc2) and written to the same slots of out."""
    pid = tl.program_id(0)
    vision_start = tl.load(vision_start_ptr)
    num_language = tl.load(num_language_ptr)
    language_m = tl.cdiv(num_language, BLOCK_M)
    num_pid_m = language_m + tl.cdiv(num_rows - num_language, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[num_slots, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_lang = tl.make_tensor_descriptor(w_lang_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    w_vis = tl.make_tensor_descriptor(w_vis_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    w2_lang = tl.make_tensor_descriptor(w2_lang_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    w2_vis = tl.make_tensor_descriptor(w2_vis_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    for tile in tl.range(pid, num_pid_m * num_pid_n, tl.num_programs(0), warp_specialize=WS):
        is_vision, slot0, n0 = _sk_tile(tile, num_pid_m, num_pid_n, language_m, vision_start, GROUP_M, BLOCK_M,
                                        BLOCK_N)  # fmt: skip
        w, w2 = _expert_pick(is_vision, w_lang, w_vis, w2_lang, w2_vis)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):  # TMA reads past K, N or the last slot return zeros
            a = x_desc.load([slot0, k * BLOCK_K])
            acc = tl.dot(a, w.load([n0, k * BLOCK_K]).T, acc, input_precision=PRECISION)
            if GATED:
                acc2 = tl.dot(a, w2.load([n0, k * BLOCK_K]).T, acc2, input_precision=PRECISION)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc2  # silu(gate) * up, in fp32
        if HAS_BIAS_LANG or HAS_BIAS_VIS:
            # NOTE: a select, not expert_linear's `if is_vision:` around each load: a branch on a
            # run-time value inside the loop leaves it unpartitioned (4 warps then spill 704 bytes)
            zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
            b_lang = tl.load(b_lang_ptr + offs_n, mask=offs_n < N).to(tl.float32) if HAS_BIAS_LANG else zero
            b_vis = tl.load(b_vis_ptr + offs_n, mask=offs_n < N).to(tl.float32) if HAS_BIAS_VIS else zero
            acc += tl.where(is_vision, b_vis, b_lang)[None, :]
        # slots past the region's last row hold padding: written, and never read as rows
        slots = (slot0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        out_ptrs = out_ptr + slots[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=offs_n[None, :] < N)


def _launch(x, routing: ExpertRouting, weights: list[torch.Tensor], b_lang, b_vis, gated: bool) -> torch.Tensor:
    num_slots, in_features = x.shape
    out_features = weights[0].shape[0]
    if num_slots != routing.num_slots:
        raise ValueError(f"x must hold the routing's {routing.num_slots} slots, got {num_slots} rows")
    for t in [x, *weights]:
        if t.dtype != x.dtype or t.device != x.device or not t.is_contiguous() or not tma_ready(t):
            raise ValueError("x and the weights must be contiguous, 16-byte aligned tensors of one dtype and device")
    if any(w.shape != (out_features, in_features) for w in weights):
        raise ValueError(f"every weight must be [{out_features}, {in_features}]")
    check_biases(b_lang, b_vis, out_features)
    if not has_tma(x.device):
        raise ValueError("grouped_expert_linear reads every tile through TMA: sm_90 or later")
    out = torch.empty(num_slots, out_features, dtype=x.dtype, device=x.device)
    set_tma_allocator(x.device)
    w_lang, w_vis = weights[0], weights[1]
    w2_lang, w2_vis = (weights[2], weights[3]) if gated else (w_lang, w_vis)
    # fmt: off
    _grouped_expert_kernel[(_num_sms(x.device),)](
        x, out, w_lang, w_vis, w2_lang, w2_vis,
        b_lang if b_lang is not None else w_lang, b_vis if b_vis is not None else w_vis,  # unused when absent
        routing.vision_start, routing.num_language,
        routing.vision_mask.shape[0], num_slots, out_features, in_features, out.stride(0),
        tuning_bucket(routing.vision_mask.shape[0]),
        HAS_BIAS_LANG=b_lang is not None, HAS_BIAS_VIS=b_vis is not None, GATED=gated,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", GROUP_M=GROUP_M,
    )
    # fmt: on
    return out


def grouped_expert_linear(
    x: torch.Tensor,  # [num_slots, in]: rows in routing's slot order
    routing: ExpertRouting,
    w_language: torch.Tensor,  # [out, in]
    w_vision: torch.Tensor,  # [out, in]
    b_language: torch.Tensor | None = None,  # [out]
    b_vision: torch.Tensor | None = None,  # [out]
) -> torch.Tensor:  # [num_slots, out], the same slots; padding slots hold garbage
    return _launch(x, routing, [w_language, w_vision], b_language, b_vision, gated=False)


def grouped_gated_up(
    x: torch.Tensor,  # [num_slots, in]: rows in routing's slot order
    routing: ExpertRouting,
    gate_language: torch.Tensor,  # [inter, in]
    up_language: torch.Tensor,
    gate_vision: torch.Tensor,
    up_vision: torch.Tensor,
) -> torch.Tensor:  # [num_slots, inter]: silu(x @ gate.T) * (x @ up.T), each slot by its expert
    return _launch(x, routing, [gate_language, gate_vision, up_language, up_vision], None, None, gated=True)
