"""model/gemv_tuning.py on CPU: each projection's chain runs (the Triton GEMVs in the interpreter)
under every config, and the one the timer calls fastest is pinned for its call shapes. On a GPU
the timer replays the chain from a CUDA graph."""

import pytest
import torch

import kernels.gemv as gemv_module
from kernels.gemv import PLAIN, RMS_NORM, SAFE_CONFIG, SILU_AND_MUL
from model.cogvlm import CogVLMForCausalLM
from model.gemv_tuning import PROJECTIONS, tune_one_row_gemvs
from model.tiny_checkpoint import tiny_config
from tests.kernels.error_bound import DEVICE


@pytest.mark.parametrize("generation", [1, 2])
def test_each_projection_pins_the_config_its_chain_ran_fastest_with(monkeypatch, generation):
    monkeypatch.setattr(gemv_module, "_pinned", {})
    cfg = tiny_config(generation, vocab_size=100)
    model = CogVLMForCausalLM(cfg).to(DEVICE).eval()  # compiled kernels on a GPU read CUDA tensors only
    model.fuse_for_inference()  # the fused gate_up weight the one-row path reads
    layers = model.model.layers
    configs = [type(SAFE_CONFIG)({**SAFE_CONFIG.kwargs, "BLOCK_N": bn}, num_warps=4, num_stages=2) for bn in (16, 32)]
    fastest = {"qkv": 32, "dense": 16, "gate_up": 16, "down": 32}  # BLOCK_N the fake timer favours
    timed = []  # (projection, BLOCK_N pinned for its shape while its chain was timed)

    def timer(fn):  # projections in order, each under every config in order
        projection = PROJECTIONS[len(timed) // len(configs)]
        weight = projection.weight(layers[0])
        has_residual = projection.prologue == RMS_NORM
        config = gemv_module.pinned()[(*weight.shape, projection.prologue, has_residual, weight.dtype)]
        fn()  # the chain itself runs (interpreter), under that config
        timed.append((projection.name, config.kwargs["BLOCK_N"]))
        return 1.0 if config.kwargs["BLOCK_N"] == fastest[projection.name] else 2.0

    chosen = tune_one_row_gemvs(layers, pdl=False, early_trigger=frozenset(), configs=configs, timer=timer)
    assert {name: c.kwargs["BLOCK_N"] for name, c in chosen.items()} == fastest
    assert sorted(timed) == sorted((name, bn) for name in fastest for bn in (16, 32))  # every config timed
    shape = {p.name: tuple(p.weight(layers[0]).shape) for p in PROJECTIONS}
    prologue = {"qkv": RMS_NORM, "dense": PLAIN, "gate_up": RMS_NORM, "down": SILU_AND_MUL}
    pins = gemv_module.pinned()
    for name, bn in fastest.items():
        residual_kinds = (True, False) if prologue[name] == RMS_NORM else (False,)  # layer 0's qkv has none
        for has_residual in residual_kinds:
            assert pins[(*shape[name], prologue[name], has_residual, torch.float32)].kwargs["BLOCK_N"] == bn


@pytest.mark.gpu
def test_tuning_in_a_graph_on_the_gpu_pins_configs_that_compute_the_same(monkeypatch):
    """The real timer: each projection's chain captured in a CUDA graph (with PDL on sm_90) under
    each of kernels/gemv.py's GPU configs; afterwards every pinned shape computes what the
    autotuned kernel computes, to the GEMV tests' bound."""
    from kernels.gemv import rms_norm_gemv, rms_norm_gemv_ref
    from tests.kernels.error_bound import check_close

    monkeypatch.setattr(gemv_module, "_pinned", {})
    model = CogVLMForCausalLM(tiny_config(2, vocab_size=100)).to("cuda", torch.bfloat16).eval()
    model.fuse_for_inference(one_row_gemv=True, pdl=True)
    layers = model.model.layers
    chosen = tune_one_row_gemvs(layers, pdl=True, early_trigger=frozenset({"dense", "down"}),
                                prefetch=frozenset({"dense"}))  # as the engine tunes them  # fmt: skip
    assert set(chosen) == {p.name for p in PROJECTIONS} and all(c in gemv_module.GPU_CONFIGS for c in chosen.values())
    assert len(gemv_module.pinned()) == 6  # 4 shapes, and qkv and gate_up without a residual too
    qkv = layers[0].self_attn.language_expert_query_key_value.weight
    norm = layers[0].input_layernorm
    x = torch.randn(1, qkv.shape[1], device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    out, _ = rms_norm_gemv(x, residual, norm.weight, norm.eps, qkv, pdl=True)
    exact, _ = rms_norm_gemv_ref(x.double(), residual.double(), norm.weight.double(), norm.eps, qkv.double())
    check_close(out, exact, rms_norm_gemv_ref(x, residual, norm.weight, norm.eps, qkv)[0])
