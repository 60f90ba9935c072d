import pytest
import torch
from PIL import Image

import model.cogvlm as cogvlm
import model.dispatch as dispatch
import model.experts as experts
import model.rms_norm as rms_norm_module
import model.rotary as rotary_module
from model.config import CogVLMConfig
from model.generation import GenerationParams, generate_reference
from model.processor import Conversation, Processor, load_tokenizer
from model.weights import load_model


def image_prompt(tiny_checkpoint):
    """A question about a random 20 x 30 image, built by the checkpoint's processor."""
    processor = Processor(load_tokenizer(tiny_checkpoint), CogVLMConfig.from_checkpoint(tiny_checkpoint))
    image = Image.fromarray((torch.rand(20, 30, 3) * 255).byte().numpy())
    return processor.build(Conversation(query="What is it?", image=image))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter variant; the CUDA one is below")
def test_model_with_triton_kernels_gives_the_same_tokens(monkeypatch, tiny_checkpoint):
    """The six projections wired to the routed kernels, the fused norms, rotary and silu*up
    (interpreter on CPU) change no token."""
    model = load_model(tiny_checkpoint, torch.float32)
    inputs = image_prompt(tiny_checkpoint)
    params = GenerationParams(max_tokens=4, stop_token_ids=(), top_logprobs=3)
    want = generate_reference(model, inputs, params)
    monkeypatch.setattr(dispatch, "FORCE_TRITON", True)
    calls = []
    for module, name in [(experts, "expert_linear"), (experts, "silu_and_mul"), (rms_norm_module, "rms_norm"),
                         (rotary_module, "rotary_embedding_")]:  # fmt: skip
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    got = generate_reference(model, inputs, params)
    assert set(calls) == {"expert_linear", "silu_and_mul", "rms_norm", "rotary_embedding_"}
    assert got.output_token_ids == want.output_token_ids
    for got_top, want_top in zip(got.top_logprobs, want.top_logprobs, strict=True):
        assert [t for t, _ in got_top] == [t for t, _ in want_top]
        assert [lp for _, lp in got_top] == pytest.approx([lp for _, lp in want_top], abs=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter variant; the CUDA engine test covers CUDA")
def test_one_row_gemv_layers_give_the_same_tokens(monkeypatch, tiny_checkpoint):
    """Batch-1 text decodes through kernels/gemv.py (norms and silu * up in the GEMV prologues)
    give the eager layers' tokens and logprobs; the prefill (image rows) keeps the routed path."""
    model = load_model(tiny_checkpoint, torch.float32)
    inputs = image_prompt(tiny_checkpoint)
    params = GenerationParams(max_tokens=5, stop_token_ids=(), top_logprobs=3)
    want = generate_reference(model, inputs, params)  # the torch layers, the reference of the test above too
    monkeypatch.setattr(dispatch, "FORCE_TRITON", True)
    model.fuse_for_inference(one_row_gemv=True)
    calls, asked = [], []  # each GEMV's name; those that ask L2 for their weights first
    for name in ("gemv", "rms_norm_gemv", "silu_and_mul_gemv"):
        original = getattr(cogvlm, name)

        def spy(*a, _f=original, _n=name, **k):
            calls.append(_n)
            if k.get("prefetch"):
                asked.append(_n)
            return _f(*a, **k)

        monkeypatch.setattr(cogvlm, name, spy)
    got = generate_reference(model, inputs, params)
    decodes, layers = params.max_tokens - 1, model.config.num_layers
    assert calls.count("rms_norm_gemv") == 2 * decodes * layers  # both norms of every decode layer
    assert calls.count("gemv") == calls.count("silu_and_mul_gemv") == decodes * layers
    assert asked == ["gemv"] * decodes * layers  # the attention output projection (cogvlm.L2_PREFETCH)
    assert got.output_token_ids == want.output_token_ids
    for got_top, want_top in zip(got.top_logprobs, want.top_logprobs, strict=True):
        assert [t for t, _ in got_top] == [t for t, _ in want_top]
        assert [lp for _, lp in got_top] == pytest.approx([lp for _, lp in want_top], abs=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter variant; the CUDA engine test covers CUDA")
def test_one_row_logits_take_the_final_norm_into_the_lm_head_gemv(monkeypatch, tiny_checkpoint):
    """forward_logits on one text row: the final RMSNorm runs in the lm_head GEMV's prologue, which
    writes fp32 logits; the same logits as the norm, lm_head and cast apart. Two rows, or a model
    without the one-row path, take the three apart."""
    from model.attention import ContiguousKVCache

    model = load_model(tiny_checkpoint, torch.float32)
    cfg = model.config
    monkeypatch.setattr(dispatch, "FORCE_TRITON", True)
    ids = torch.tensor([5, 9, 17])

    def logits(fused: bool, rows: int) -> torch.Tensor:
        cache = ContiguousKVCache(cfg.num_layers, 3, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"))
        out = None
        with torch.inference_mode():
            for start in range(0, 3, rows):  # a prefill of `rows`, then one row at a time
                embeds, positions = model.embed(ids[start : start + rows]), torch.arange(start, start + rows)
                if fused:
                    out = model.forward_logits(embeds, positions, None, cache)
                else:
                    out = model.compute_logits(model(embeds, positions, None, cache))
                cache.advance(embeds.shape[0])
        return out

    want = logits(False, 1)
    model.fuse_for_inference(one_row_gemv=True)
    weights = []
    original = cogvlm.rms_norm_gemv
    monkeypatch.setattr(cogvlm, "rms_norm_gemv", lambda *a, **k: weights.append(a[4]) or original(*a, **k))
    got = logits(True, 1)
    assert got.dtype == torch.float32 and got.shape == (1, cfg.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sum(w is model.lm_head.weight for w in weights) == 3  # the last row of each of the 3 steps
    weights.clear()
    logits(True, 3)  # one step of 3 rows
    assert not any(w is model.lm_head.weight for w in weights)


# the grouped kernel leaves slots of padding-only tiles unwritten, and the row-wise norms read them
# (use_grouped_expert_rows): numpy may warn about what it finds there, rows no result reads
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("triton", [False, True], ids=["torch", "interpreter"])
def test_grouped_expert_rows_give_the_same_tokens(monkeypatch, tiny_checkpoint, triton):
    """Hidden states carried in the routing's slot order (use_grouped_expert_rows): the projections
    take the slots as they are (the interpreter: kernels/grouped_expert_linear.py; torch: the
    references over the slots' mask), attention reads rows back in order, and the tokens and
    logprobs are the batch-order path's."""
    if triton and torch.cuda.is_available():
        pytest.skip("interpreter variant; the CUDA engine test covers CUDA")
    model = load_model(tiny_checkpoint, torch.float32)
    if triton and model.config.generation == 1:  # 9 s of the suite's time on this project's machine
        pytest.skip("the interpreter runs CogVLM2's layout (GQA, the vision QKV bias); torch runs both")
    inputs = image_prompt(tiny_checkpoint)
    # the prefill's token, then one decode that reads the K/V the grouped prefill wrote
    params = GenerationParams(max_tokens=2, stop_token_ids=(), top_logprobs=3)
    want = generate_reference(model, inputs, params)
    monkeypatch.setattr(dispatch, "FORCE_TRITON", triton)
    calls = []
    for name in ("expert_linear", "expert_gated_up", "grouped_expert_linear", "grouped_gated_up", "expert_linear_ref"):
        original = getattr(experts, name)
        monkeypatch.setattr(experts, name, lambda *a, _f=original, _n=name, **k: calls.append((_n, a[0].shape[0])) or
                            _f(*a, **k))  # fmt: skip
    model.use_grouped_expert_rows(True)
    got = generate_reference(model, inputs, params)
    num_slots = experts.route_by_expert(torch.zeros(inputs.num_tokens, dtype=torch.bool)).num_slots
    if triton:  # the prefill's launches, each over the slots; decodes are dense
        assert sorted(set(calls)) == [("grouped_expert_linear", num_slots), ("grouped_gated_up", num_slots)]
        assert len(calls) == 4 * model.config.num_layers  # a layer's qkv, dense, gate_up with silu * up, down
    else:
        assert set(calls) == {("expert_linear_ref", num_slots)}
    assert got.output_token_ids == want.output_token_ids
    for got_top, want_top in zip(got.top_logprobs, want.top_logprobs, strict=True):
        assert [t for t, _ in got_top] == [t for t, _ in want_top]
        assert [lp for _, lp in got_top] == pytest.approx([lp for _, lp in want_top], abs=1e-4)


def test_grouped_expert_rows_need_tma_on_cuda(monkeypatch):
    """A GPU before sm_90 has no TMA, which every tile of the grouped kernel reads through: asking
    for grouped rows there fails at start, naming the card, not at the first image step."""
    monkeypatch.setattr(cogvlm, "has_tma", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    fake = type("Model", (), {"device": torch.device("cuda", 0), "grouped_expert_rows": False})()
    with pytest.raises(ValueError, match="sm_90 or later.*Tesla V100"):
        cogvlm.CogVLMForCausalLM.use_grouped_expert_rows(fake, True)
    cogvlm.CogVLMForCausalLM.use_grouped_expert_rows(fake, False)  # the default asks for nothing
    assert fake.grouped_expert_rows is False


def test_no_vision_token_takes_the_dense_path(monkeypatch):
    layer = torch.nn.Linear(8, 4, bias=False)
    other = torch.nn.Linear(8, 4, bias=False)
    monkeypatch.setattr(experts, "expert_linear_ref", None)  # would raise if called
    x = torch.randn(3, 8)
    torch.testing.assert_close(experts.routed_linear(x, None, layer, other), layer(x))


@pytest.mark.gpu
def test_model_on_cuda_matches_the_cpu_reference(tiny_checkpoint):
    """fp32 on CUDA, routed Triton kernels compiled, against the CPU reference path."""
    inputs = image_prompt(tiny_checkpoint)
    params = GenerationParams(max_tokens=6, stop_token_ids=())
    want = generate_reference(load_model(tiny_checkpoint, torch.float32, "cpu"), inputs, params)
    got = generate_reference(load_model(tiny_checkpoint, torch.float32, "cuda"), inputs, params)
    assert got.output_token_ids == want.output_token_ids


def test_fused_language_gate_up_keeps_names_values_and_outputs(monkeypatch, tiny_checkpoint):
    """The dense path's one-GEMM gate_up (CUDA; interpreter here) gives what two GEMMs give."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(tiny_checkpoint, torch.float32, device)
    mlp = model.model.layers[1].mlp
    x = torch.randn(5, model.config.hidden_size, device=device)
    monkeypatch.setattr(dispatch, "FORCE_TRITON", True)  # a no-op on CUDA, where Triton runs anyway
    want = mlp(x, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_for_inference()
    model.fuse_for_inference()  # idempotent
    fused, gate = mlp.language_gate_up, mlp.language_mlp.gate_proj.weight
    assert fused.shape == (2 * gate.shape[0], gate.shape[1]) and gate.data_ptr() == fused.data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    calls = []
    monkeypatch.setattr(experts, "F", type("F", (), {"linear": lambda a, w: calls.append(w.shape) or a @ w.T}))
    torch.testing.assert_close(mlp(x, None), want)
    assert calls[0] == fused.shape  # one GEMM for gate and up


def test_autograd_takes_the_torch_path(monkeypatch):
    """The kernels have no backward: with gradients wanted, dispatch picks torch (training)."""
    monkeypatch.setattr(dispatch, "FORCE_TRITON", True)
    x = torch.randn(3, 8, requires_grad=True)
    assert not dispatch.use_triton(x)
    with torch.no_grad():
        assert dispatch.use_triton(x)
    assert dispatch.use_triton(x.detach())
