"""The engine's greedy tokens equal the reference path's, whatever the batching does."""

import pytest
import torch

from model.decode_graphs import capture_sizes
from model.processor import Conversation
from model.sampling_params import ParamError, SamplingParams
from tests.server.engine_helpers import MAX_TOKENS, engine_config, greedy


def run(engine, prompts, **params):
    outputs = engine.generate([(p, greedy(MAX_TOKENS, **params)) for p in prompts])
    return [o[0].token_ids for o in outputs]


def kernel_engine(monkeypatch, setup, tiny_checkpoint, interpret_all: bool = True, **config):
    """An engine whose forward runs the Triton kernels: compiled, on a CUDA copy of the model (fp32),
    where there is a GPU; else in the interpreter, on the CPU model (with interpret_all=False only the
    kernels a backend calls itself: the rest of the model keeps its torch path)."""
    from model import dispatch
    from model.weights import load_model
    from server.engine import Engine

    if not torch.cuda.is_available():
        monkeypatch.setattr(dispatch, "FORCE_TRITON", interpret_all)
        return setup.engine(**config)
    model = load_model(tiny_checkpoint, torch.float32, "cuda")
    return Engine(model, setup.processor, engine_config(model, **config))


@pytest.mark.parametrize("budget", [1, 5, 7, 16, 33, 2048])
def test_chunked_prefill_at_every_offset_matches_reference(setup, prompts_and_reference, budget):
    prompts, reference = prompts_and_reference
    engine = setup.engine(max_num_batched_tokens=budget)
    chunk_ends = set()
    forward = engine.runner.forward

    def recording(out, feed=None):
        assert out.num_tokens <= budget
        for s in out.scheduled:
            slots = s.seq.prompt.image_slots
            if slots and slots[0] <= s.end - 1 <= slots[-1]:
                chunk_ends.add(s.end - slots[0])  # offset of the chunk's last token inside the image
        return forward(out, feed)

    engine.runner.forward = recording
    assert run(engine, prompts) == reference
    num_image = setup.model.config.num_image_tokens
    if budget == 1:  # every token is a chunk end: every offset inside the image span was hit
        assert chunk_ends == set(range(1, num_image + 1))
    elif budget < num_image:
        assert len(chunk_ends) > 1


def test_preemption_keeps_tokens_and_frees_everything(setup, prompts_and_reference):
    prompts, reference = prompts_and_reference
    engine = setup.engine(num_kv_blocks=14, max_num_batched_tokens=64)  # ~2 image requests fit at once
    assert run(engine, prompts) == reference
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.num_free_blocks == 14


def test_recompute_after_preemption_samples_only_at_its_end(setup, prompts_and_reference):
    """A preempted request recomputes prompt + generated tokens. With a budget of one token its
    generated tokens come back one per step, past the prompt: rows that look like decodes but
    must not sample (only the step that reaches the sequence's end does)."""
    prompts, reference = prompts_and_reference
    engine = setup.engine(max_num_batched_tokens=1)
    engine.add_request("r", prompts[3], greedy(MAX_TOKENS))  # short, text only
    tokens = []
    while len(tokens) < 3:
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    engine.scheduler._preempt(engine.scheduler.running.pop())
    recomputed = []  # starts of one-token rows past the prompt that end short of the sequence
    original = engine.runner.forward

    def forward(out, feed=None):
        prompt_len = len(prompts[3].input_ids)
        recomputed.extend(s.start for s in out.scheduled if prompt_len <= s.start < s.seq.num_tokens - 1)
        return original(out, feed)

    engine.runner.forward = forward
    while engine.has_unfinished:
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert tokens == reference[3]
    assert len(recomputed) >= 2  # one-token rows past the prompt that did not sample


def test_prefix_cache_hits_give_the_same_tokens(setup):
    image_prompts = [p for p in setup.prompts(6) if p.pixels is not None]
    same = image_prompts[0]
    other_question = setup.processor.build(Conversation(query="Something else entirely?", image=setup.images[0]))
    engine = setup.engine()
    first = run(engine, [same])
    assert engine.kv.num_prefix_hits == 0
    again = run(engine, [same])
    hits_after_same = engine.kv.num_prefix_hits
    assert hits_after_same >= (same.num_tokens - 1) // 16 * 16 - 16  # all but the last block or two
    different = run(engine, [other_question])
    assert engine.kv.num_prefix_hits > hits_after_same  # BOS + the image's blocks are shared
    assert first == again == [setup.reference(same, MAX_TOKENS)]
    assert different == [setup.reference(other_question, MAX_TOKENS)]
    assert engine.runner.num_images_encoded == 1  # the encoder cache served the rest


def test_vision_tower_calls_are_timed_once(setup):
    images = [p for p in setup.prompts(6) if p.pixels is not None][:2]  # two different images
    engine = setup.engine(max_num_batched_tokens=8)  # one chunk at a time: two tower calls
    run(engine, images)
    seconds = engine.runner.drain_encode_seconds()
    assert len(seconds) == engine.runner.num_images_encoded == 2 and all(s > 0 for s in seconds)
    assert engine.runner.drain_encode_seconds() == []


def test_different_images_never_share_blocks(setup):
    a = setup.processor.build(Conversation(query="Hi", image=setup.images[0]))
    b = setup.processor.build(Conversation(query="Hi", image=setup.images[1]))
    engine = setup.engine()
    run(engine, [a])
    assert run(engine, [b]) == [setup.reference(b, MAX_TOKENS)]
    assert engine.kv.num_prefix_hits == 0  # the first block already holds image slots


def test_aborts_mid_generation(setup, prompts_and_reference):
    prompts, reference = prompts_and_reference
    engine = setup.engine(max_num_batched_tokens=40)
    for i, prompt in enumerate(prompts[:8]):
        engine.add_request(f"r{i}", prompt, greedy(MAX_TOKENS))
    finished = {}
    for step in range(200):
        if step == 3:
            for rid in ("r1", "r4", "r6"):
                engine.abort(rid)
        for out in engine.step():
            assert out.request_id not in ("r1", "r4", "r6") or step < 3
            if out.finished:
                finished[out.request_id] = out.token_ids
        if not engine.has_unfinished:
            break
    assert set(finished) == {"r0", "r2", "r3", "r5", "r7"}
    for rid, tokens in finished.items():
        assert tokens == reference[int(rid[1:])]
    assert engine.kv.num_free_blocks == len(engine.kv.pool.blocks)


def test_seeded_sampling_is_reproducible_and_batch_independent(setup):
    prompts = setup.prompts(8)
    seeded = SamplingParams(temperature=1.5, top_p=0.9, seed=1234, max_tokens=8, ignore_eos=True)

    def alone():
        return setup.engine().generate([(prompts[0], seeded)])[0][0].token_ids

    def crowded():
        others = [(p, SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)) for p in prompts[1:]]
        return setup.engine(max_num_batched_tokens=50).generate([*others, (prompts[0], seeded)])[-1][0].token_ids

    first = alone()
    assert first == alone() == crowded()
    different_seed = SamplingParams(**{**seeded.__dict__, "seed": 99})
    assert setup.engine().generate([(prompts[0], different_seed)])[0][0].token_ids != first


def test_n_completions_and_stop_strings(setup, prompts_and_reference):
    prompts, reference = prompts_and_reference
    engine = setup.engine()
    outputs = engine.generate([(prompts[1], SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=4))])[0]
    assert [o.index for o in outputs] == [0, 1, 2] and all(o.finished for o in outputs)
    top = SamplingParams(temperature=1.0, n=2, seed=2**63 - 1, max_tokens=2)  # the second seed wraps to -2**63
    assert [o.finished for o in engine.generate([(prompts[1], top)])[0]] == [True, True]
    full_text = setup.processor.decode(reference[1])
    stop = full_text[2:4]
    assert stop.strip(), f"the reference text {full_text!r} gives no usable stop string"
    out = engine.generate([(prompts[1], greedy(MAX_TOKENS, stop=(stop,)))])[0][0]
    assert out.finish_reason == "stop" and out.text == full_text[: full_text.find(stop)]


def test_request_validation(setup):
    engine = setup.engine(max_model_len=50)
    long_prompt = setup.prompts(1)[0]
    with pytest.raises(ParamError, match="max_model_len 50"):
        engine.add_request("x", long_prompt, greedy(4))
    with pytest.raises(ParamError, match="top_p"):
        SamplingParams(top_p=0)
    short = setup.prompts(2)[1]
    engine.add_request("dup", short, greedy(4))
    with pytest.raises(ParamError, match="already in use"):
        engine.add_request("dup", short, greedy(4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter variant; the CUDA one is below")
def test_triton_attention_backend_gives_the_same_tokens(setup, prompts_and_reference):
    """Our paged-attention kernel (interpreter on CPU) inside the engine, chunked prefill included."""
    prompts, reference = prompts_and_reference
    engine = setup.engine(attention_backend="triton", max_num_batched_tokens=48)
    picked = [0, 1, 3]  # an image request and two text-only ones
    assert run(engine, [prompts[i] for i in picked]) == [reference[i] for i in picked]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter variant; the CUDA one is below")
def test_decode_graph_path_gives_the_same_tokens(setup, prompts_and_reference):
    """What the CUDA graphs record, run uncaptured on CPU: padded static buffers, the scratch
    block for padding rows, Triton attention (interpreter). 5 requests over graphs of at most 4
    rows: batches of 3 pad to 4, a batch of 5 falls back to the eager path."""
    prompts, reference = prompts_and_reference
    engine = setup.engine(max_num_batched_tokens=64)
    engine.runner.enable_decode_graphs(max_batch=4, max_model_len=engine.max_model_len, capture=False)
    graphs = engine.runner.decode_graphs
    batches, original = [], graphs.run
    graphs.run = lambda *args: batches.append(len(args[0])) or original(*args)
    picked = [0, 1, 3, 5, 6]
    lengths = [6, 5, 4, 3, 2]  # requests finish one by one: decode batches shrink
    outputs = engine.generate([(prompts[i], greedy(n)) for i, n in zip(picked, lengths, strict=True)])
    assert [o[0].token_ids for o in outputs] == [reference[i][:n] for i, n in zip(picked, lengths, strict=True)]
    assert graphs.sizes == [1, 2, 4] and 3 in batches  # a batch of 3 ran padded to 4
    scratch = engine.runner.kv_cache.scratch_block
    assert engine.kv.num_free_blocks == len(engine.kv.pool.blocks) == scratch  # the pool never hands it out


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter variant; the CUDA one is below")
def test_one_row_gemv_decodes_give_the_same_tokens(monkeypatch, tiny_checkpoint, setup, prompts_and_reference):
    """One request (max_num_seqs=1), so every decode is one row: the graph's static buffers, Triton
    attention and kernels/gemv.py's fused layers (every kernel in the interpreter)."""
    import model.cogvlm as cogvlm
    import model.dispatch as dispatch
    from model.weights import load_model
    from server.engine import Engine, EngineConfig

    prompts, reference = prompts_and_reference
    monkeypatch.setattr(dispatch, "FORCE_TRITON", True)
    model = load_model(tiny_checkpoint, torch.float32)  # not the shared one: fusing changes its layers
    model.fuse_for_inference(one_row_gemv=True)
    engine = Engine(model, setup.processor, EngineConfig(num_kv_blocks=512, max_num_seqs=1, attention_backend="triton"))
    engine.runner.enable_decode_graphs(max_batch=1, max_model_len=engine.max_model_len, capture=False)
    calls = []
    original = cogvlm.silu_and_mul_gemv
    monkeypatch.setattr(cogvlm, "silu_and_mul_gemv", lambda *a, **k: calls.append(1) or original(*a, **k))
    picked = [0]  # an image request: its decodes attend over image keys (a text-only one adds 20 s, no new path)
    assert run(engine, [prompts[i] for i in picked]) == [reference[i] for i in picked]
    decodes = len(picked) * (MAX_TOKENS - 1)
    assert engine.runner.decode_graphs.num_runs == decodes and len(calls) == decodes * model.config.num_layers


def test_flash_attn_backend_gives_the_same_tokens(monkeypatch, setup, tiny_checkpoint, prompts_and_reference):
    """The flash_attn backend's calls (a stand-in of flash-attn's varlen kernel that checks its
    contract; no flash-attn wheel exists for this CPU machine or the lent GPU's image), with
    256-token pages, chunked prefill and mixed decode + prefill steps; its K/V write and rotary are
    our Triton kernels (compiled on a GPU; on CPU the interpreter runs them, and the rest of the model
    takes its torch path, which other tests cover against the kernels)."""
    import sys

    from model.paged_attention import FlashAttnPagedAttention, make_attention_backend
    from tests.server import flash_attn_stand_in

    prompts, reference = prompts_and_reference
    engine = kernel_engine(monkeypatch, setup, tiny_checkpoint, interpret_all=False, attention_backend="triton",
                           block_size=256, num_kv_blocks=16, max_num_batched_tokens=40, cuda_graphs=False)  # fmt: skip
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_stand_in)
    cache = engine.runner.kv_cache
    engine.runner.attention = make_attention_backend("flash_attn", cache, torch.device("cuda"))  # CUDA's path
    assert isinstance(engine.runner.attention, FlashAttnPagedAttention)
    flash_attn_stand_in.calls.clear()
    flash_attn_stand_in.query_lens.clear()
    picked = [0, 3, 4]  # two image requests and a text-only one: chunks, decodes and mixed steps
    assert run(engine, [prompts[i] for i in picked]) == [reference[i] for i in picked]
    calls = set(flash_attn_stand_in.calls)
    assert any(q == 1 for q, _ in calls) and any(q == 40 for q, _ in calls)  # decodes, and full chunks
    assert any(1 in lens and max(lens) > 1 for lens in flash_attn_stand_in.query_lens)  # a decode beside a chunk


def test_flash_attn_backend_refuses_what_it_cannot_run(monkeypatch, setup):
    import sys

    from model.paged_attention import PagedKVCache, make_attention_backend
    from tests.server import flash_attn_stand_in

    cache = PagedKVCache(1, 4, 16, 2, 8, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA only"):
        make_attention_backend("flash_attn", cache, torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    with pytest.raises(ValueError, match="needs the flash-attn package"):
        make_attention_backend("flash_attn", cache, torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_stand_in)
    with pytest.raises(ValueError, match="--block-size 256"):
        make_attention_backend("flash_attn", cache, torch.device("cuda"))
    with pytest.raises(ValueError, match="auto, torch, triton or flash_attn"):
        make_attention_backend("xformers", cache, torch.device("cuda"))


def test_tuning_at_start_covers_every_expert_kernel_call_of_serving(monkeypatch, setup, prompts_and_reference):
    """ModelRunner.tune_expert_kernels runs each routed projection (shape, bias, gated or not) in
    every autotuning row bucket a step can fall in, so serving never tunes: the kernels are
    replaced by a spy that records the autotuner's key and computes the reference."""
    import torch.nn.functional as F

    from kernels.expert_linear import expert_gated_up_ref, expert_linear_ref
    from kernels.expert_routing import tuning_bucket
    from model import experts

    keys = []

    def spy(kind, reference):
        def kernel(x, vision_mask, *weights, routing=None):
            shapes = tuple(None if w is None else tuple(w.shape) for w in weights)  # biases included
            keys.append((kind, shapes, x.dtype, tuning_bucket(x.shape[0])))
            return reference(x, vision_mask, *weights)

        return kernel

    monkeypatch.setattr(experts, "use_triton", lambda x: True)  # the CUDA dispatch, on CPU
    monkeypatch.setattr(experts, "expert_linear", spy("linear", expert_linear_ref))
    monkeypatch.setattr(experts, "expert_gated_up", spy("gated", expert_gated_up_ref))
    monkeypatch.setattr(experts, "silu_and_mul", lambda gate, up: F.silu(gate) * up)
    budget = 300  # steps of 1 to 300 tokens: two buckets
    engine = setup.engine(max_num_batched_tokens=budget)
    assert engine.runner.tune_expert_kernels(budget) == [256, 300]
    tuned = set(keys)
    keys.clear()
    prompts, reference = prompts_and_reference
    assert run(engine, prompts + prompts[:4]) == reference + reference[:4]
    served = set(keys)
    assert len({key[3] for key in served}) == 2  # a full 300-token step and smaller chunks
    assert {key[0] for key in served} == {"linear", "gated"}
    assert served <= tuned, served - tuned


def test_tuning_at_start_runs_the_real_kernels(monkeypatch, setup, tiny_checkpoint):
    """The same warm-up through the Triton kernels themselves (the interpreter on CPU, compiled on a
    GPU): the shapes, masks and biases it hands them are ones they accept, in both generations."""
    engine = kernel_engine(monkeypatch, setup, tiny_checkpoint, max_num_batched_tokens=300)
    assert engine.runner.tune_expert_kernels(300) == [256, 300]


def test_grouped_expert_rows_give_the_same_tokens(setup, prompts_and_reference):
    """--expert-rows grouped: steps mixing prefill chunks of several image requests with decode rows
    run in slot order through the layers, and every request's tokens are the reference path's."""
    prompts, reference = prompts_and_reference
    engine = setup.engine(max_num_batched_tokens=40, expert_rows="grouped")
    assert engine.model.grouped_expert_rows
    steps = []
    forward = engine.runner.forward
    engine.runner.forward = lambda out, feed=None: steps.append(len(out.scheduled)) or forward(out, feed)
    try:
        assert run(engine, prompts) == reference
    finally:
        engine.model.use_grouped_expert_rows(False)  # the module's shared model
    assert max(steps) > 1  # several sequences a step


def test_decode_graph_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "backend, cuda_graphs, look_ahead, one_row_gemv, pdl, expert_rows",
    [("triton", True, True, False, False, "gathered"), ("triton", False, True, False, False, "gathered"),
     ("torch", True, True, False, False, "gathered"), ("triton", True, False, False, False, "gathered"),
     ("triton", True, True, True, False, "gathered"), ("triton", False, True, True, False, "gathered"),
     ("triton", True, True, True, True, "gathered"), ("triton", True, True, False, True, "gathered"),
     ("triton", True, True, False, True, "grouped")],
)  # fmt: skip
def test_engine_on_cuda_matches_the_cpu_reference(
    tiny_checkpoint, prompts_and_reference, backend, cuda_graphs, look_ahead, one_row_gemv, pdl, expert_rows
):
    """fp32 on CUDA: Triton expert and paged-attention kernels, compiled, chunked prefill, decode
    steps replayed from CUDA graphs (or eager), look-ahead decode steps (or not); with
    one_row_gemv, one request at a time, so every decode takes kernels/gemv.py's layers; with
    pdl, our decode kernels as programmatic dependent launches; with grouped expert rows, image
    steps through kernels/grouped_expert_linear.py in slot order."""
    from model.weights import load_model
    from server.engine import Engine, EngineConfig
    from tests.server.engine_helpers import make_setup

    prompts, reference = prompts_and_reference
    cpu = make_setup(tiny_checkpoint)
    engine = Engine(
        load_model(tiny_checkpoint, torch.float32, "cuda"),
        cpu.processor,
        EngineConfig(num_kv_blocks=512, max_num_batched_tokens=40, attention_backend=backend,
                     max_num_seqs=1 if one_row_gemv else 12, cuda_graphs=cuda_graphs, async_scheduling=look_ahead,
                     one_row_gemv=one_row_gemv, pdl=pdl, expert_rows=expert_rows),
    )  # fmt: skip
    assert engine.model.grouped_expert_rows == (expert_rows == "grouped")
    assert run(engine, prompts) == reference
    assert (engine.num_lookahead_steps > 0) == look_ahead
    graphs = engine.runner.decode_graphs
    assert (graphs is not None and len(graphs.graphs) == len(graphs.sizes) and graphs.num_runs > 0) == cuda_graphs
    assert all(layer.one_row_gemv == one_row_gemv and layer.pdl == pdl for layer in engine.model.model.layers)
    assert getattr(engine.runner.attention, "pdl", False) == pdl and (graphs is None or graphs.pdl == pdl)


def test_an_engine_pins_no_gemv_off_cuda(monkeypatch, setup):
    """EngineConfig.pin_tuned_gemvs acts on CUDA only: a CPU engine never asks kernels/gemv.py for
    its card's table, and leaves every shape to the autotuner."""
    import kernels.gemv as gemv_module

    monkeypatch.setattr(gemv_module, "_pinned", {})
    asked = []
    monkeypatch.setattr(gemv_module, "pin_tuned", lambda *args: asked.append(args) or 0)
    setup.engine(pin_tuned_gemvs=True, one_row_gemv=True)
    assert asked == [] and not gemv_module.pinned()


@pytest.mark.gpu
def test_an_engine_pins_the_tuned_gemv_configs_of_its_card(monkeypatch, tiny_checkpoint, setup):
    """At start a CUDA engine pins kernels/gemv.py TUNED's configs for its card (here a table
    made for the tiny model's shapes, bf16) before capturing its decode graphs; its batch-1
    decodes then launch them and run to the end. Without pin_tuned_gemvs nothing is pinned."""
    import kernels.gemv as gemv_module
    from model.gemv_tuning import PROJECTIONS
    from model.weights import load_model
    from server.engine import Engine

    monkeypatch.setattr(gemv_module, "_pinned", {})
    model = load_model(tiny_checkpoint, torch.bfloat16, "cuda")
    monkeypatch.setattr(gemv_module, "TUNED", {})
    Engine(model, setup.processor, engine_config(model, max_num_seqs=1))  # fuses gate_up, the shape it reads
    assert not gemv_module.pinned()
    layer = model.model.layers[0]
    shapes = [(*p.weight(layer).shape, p.prologue, p.prologue == gemv_module.RMS_NORM) for p in PROJECTIONS]
    shapes.append((*model.lm_head.weight.shape, gemv_module.RMS_NORM, True))
    table = {shape: gemv_module.GPU_CONFIGS[i % len(gemv_module.GPU_CONFIGS)] for i, shape in enumerate(shapes)}
    monkeypatch.setattr(gemv_module, "TUNED", {torch.cuda.get_device_name(): table})
    Engine(model, setup.processor, engine_config(model, max_num_seqs=1, pin_tuned_gemvs=False))
    assert not gemv_module.pinned()  # off: nothing pinned, though the table names this card's shapes
    engine = Engine(model, setup.processor, engine_config(model, max_num_seqs=1))
    assert gemv_module.pinned() == {(*shape, torch.bfloat16): config for shape, config in table.items()}
    outputs = engine.generate([(p, greedy(MAX_TOKENS, ignore_eos=True)) for p in setup.prompts(2)])
    assert [len(o[0].token_ids) for o in outputs] == [MAX_TOKENS, MAX_TOKENS]
    assert engine.runner.decode_graphs.num_runs > 0


def test_a_stop_token_is_text_only_when_asked(setup, prompts_and_reference):
    """stop_token_ids end the completion on that token; its own text joins the output only with
    include_stop_str_in_output (vLLM's rule), as a stop string's does."""
    prompts, reference = prompts_and_reference
    tokenizer = setup.processor.tokenizer
    specials = set(tokenizer.all_special_ids)
    # a prompt whose greedy answer has a plain token first seen after the first position
    index, prompt, ids = next((k, p, ids) for p, ids in zip(prompts, reference, strict=True)
                              for k in range(1, len(ids)) if ids[k] not in specials | set(ids[:k]))  # fmt: skip
    engine = setup.engine()
    params = {"stop_token_ids": (ids[index],)}
    cut = engine.generate([(prompt, greedy(MAX_TOKENS, **params))])[0][0]
    kept = engine.generate([(prompt, greedy(MAX_TOKENS, include_stop_str_in_output=True, **params))])[0][0]
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert cut.token_ids == kept.token_ids == ids[: index + 1]
    assert cut.text == tokenizer.decode(ids[:index], skip_special_tokens=True)
    assert kept.text == tokenizer.decode(ids[: index + 1], skip_special_tokens=True) != cut.text
