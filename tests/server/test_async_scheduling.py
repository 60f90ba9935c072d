"""Look-ahead steps (EngineConfig.async_scheduling) change when tokens are read, never
which tokens come out: the same workload gives the same outputs with and without, on CPU too
(the device there is the CPU: nothing overlaps, but every code path runs)."""

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.sampling_params import OutputConstraint, SamplingParams
from tests.server.engine_helpers import MAX_TOKENS, greedy

HAS_XGRAMMAR = importlib.util.find_spec("xgrammar") is not None  # the [structured] extra: CI has it
CHOICE = OutputConstraint("choice", ("yes", "no", "red circle", "blue square"))


def summary(outputs):
    """Everything that must match exactly: per completion its index, tokens, text, finish
    reason, and which tokens its logprobs name."""

    def one(o):
        named = [(t.token_id, [i for i, _ in t.top_logprobs or []]) for t in o.new_logprobs]
        prompt = [None if p is None else (p.token_id, p.rank, [i for i, _ in p.top_logprobs])
                  for p in o.prompt_logprobs or []]  # fmt: skip
        return o.index, o.token_ids, o.text, o.finish_reason, named, prompt

    return [[one(o) for o in per_request] for per_request in outputs]


def logprob_values(outputs) -> list[float]:
    """Compared to 1e-4: when the two runs batch requests differently (a queue, chunks), fp32
    GEMMs over other row counts round the last bits differently."""
    return [v for per_request in outputs for o in per_request for t in o.new_logprobs
            for v in [t.logprob] + [lp for _, lp in t.top_logprobs or []]]  # fmt: skip


def assert_same_outputs(ahead, sync):
    assert summary(ahead) == summary(sync)
    assert logprob_values(ahead) == pytest.approx(logprob_values(sync), rel=1e-4, abs=1e-5)


def test_lookahead_gives_the_reference_tokens(setup, prompts_and_reference):
    prompts, reference = prompts_and_reference
    engine = setup.engine(async_scheduling=True)
    outputs = engine.generate([(p, greedy(MAX_TOKENS)) for p in prompts])
    assert [o[0].token_ids for o in outputs] == reference
    assert engine.num_lookahead_steps >= MAX_TOKENS - 2  # every decode step after the first looked ahead
    assert engine.kv.num_free_blocks == len(engine.kv.pool.blocks) and not engine.has_unfinished


@pytest.mark.parametrize("budget", [7, 33])
def test_lookahead_with_chunked_prefill_and_a_queue(setup, prompts_and_reference, budget):
    """Under load: a queue waits for a free slot, image prompts are split into chunks. Look-ahead
    steps then carry prefill chunks and admissions beside the decodes fed on the device."""
    prompts, reference = prompts_and_reference
    engine = setup.engine(max_num_seqs=4, max_num_batched_tokens=budget, async_scheduling=True)
    seen, chunks_ahead, admitted_ahead = set(), 0, 0
    forward = engine.runner.forward

    def recording(out, feed=None):
        nonlocal chunks_ahead, admitted_ahead
        assert out.num_tokens <= budget
        if feed is not None:
            chunks_ahead += any(s.num_new_tokens > 1 for s in out.scheduled)
            admitted_ahead += any(s.seq.request_id not in seen for s in out.scheduled)
        seen.update(s.seq.request_id for s in out.scheduled)
        return forward(out, feed)

    engine.runner.forward = recording
    outputs = engine.generate([(p, greedy(MAX_TOKENS)) for p in prompts])
    assert [o[0].token_ids for o in outputs] == reference
    assert chunks_ahead > 0 and admitted_ahead > 0
    assert engine.kv.num_free_blocks == len(engine.kv.pool.blocks)


def every_feature(setup, prompts, reference):
    """Seeded sampling, n > 1, stop strings and stop ids found mid-way (the look-ahead token is
    dropped), max_tokens of 1 to 12, logprobs (read back with the tokens), penalties and
    min_tokens (the token in flight counted on the device), allowed_token_ids and bad words of
    one and two tokens (the second compared with the token in flight), and prompt logprobs in
    the same batches."""
    stop_id = reference[2][2]  # greedy request 2 stops at its third token
    stop_text = setup.processor.decode(reference[1])[2:4]  # request 4 asks prompt 1 with this stop
    eos = setup.model.config.eos_token_ids
    assert stop_text.strip() and "\ufffd" not in stop_text
    params = [
        greedy(12),
        SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=9, ignore_eos=True),
        greedy(MAX_TOKENS, stop_token_ids=(stop_id,)),
        SamplingParams(temperature=0.8, top_k=5, min_p=0.05, seed=3, n=2, max_tokens=8),
        greedy(MAX_TOKENS, stop=(stop_text,)),
        greedy(1),
        greedy(2),
        SamplingParams(temperature=0.7, repetition_penalty=1.3, seed=5, max_tokens=3),
        greedy(10, min_tokens=3),
        greedy(3, logprobs=2),
        SamplingParams(temperature=1.2, seed=8, max_tokens=4, frequency_penalty=0.5),
        greedy(8, presence_penalty=-2.0),  # favours its own tokens: a stale list changes cogvlm2 here
        greedy(MAX_TOKENS, bad_word_ids=((reference[12][0],), tuple(reference[12][2:4]))),
        SamplingParams(
            temperature=1.0,
            seed=6,
            max_tokens=7,
            bad_word_ids=(tuple(reference[13][1:3]),),
            allowed_token_ids=tuple(t for t in range(5, 40) if t not in eos),
        ),
        greedy(4, prompt_logprobs=2),
    ]
    workload = list(zip(prompts[: len(params)], params, strict=True))
    workload[4] = (prompts[1], workload[4][1])
    return workload, stop_text


def test_every_sampling_feature_gives_the_same_outputs(setup, prompts_and_reference):
    prompts, reference = prompts_and_reference
    workload, stop_text = every_feature(setup, prompts, reference)
    sync = setup.engine(async_scheduling=False).generate(workload)
    engine = setup.engine(async_scheduling=True)
    assert_same_outputs(engine.generate(workload), sync)
    assert sync[2][0].finish_reason == "stop" and len(sync[2][0].token_ids) == 3
    assert sync[4][0].finish_reason == "stop" and stop_text not in sync[4][0].text
    assert len(sync[9][0].new_logprobs) == 3 and len(sync[9][0].new_logprobs[0].top_logprobs) == 2
    for (_, params), out in zip(workload[12:], sync[12:], strict=True):
        tokens = out[0].token_ids
        assert not any(tuple(tokens[j : j + len(w)]) == w for w in params.bad_word_ids for j in range(len(tokens)))
    assert set(sync[13][0].token_ids) <= set(workload[13][1].allowed_token_ids) and len(sync[13][0].token_ids) == 7
    assert sync[14][0].prompt_logprobs[0] is None and len(sync[14][0].prompt_logprobs) == workload[14][0].num_tokens
    assert engine.num_lookahead_steps >= 10
    assert engine.kv.num_free_blocks == len(engine.kv.pool.blocks)


def test_penalties_and_min_tokens_look_ahead(setup, prompts_and_reference):
    """They read the request's own output, the token in flight included (counted on the
    device): every decode step after the first looks ahead, and the outputs are unchanged."""
    prompts, reference = prompts_and_reference
    # min_tokens = 3 with a stop id that greedy decoding picks at index 3 (and not before): it
    # may stop there only if the token in flight counts towards the 3
    i = next(i for i, tokens in enumerate(reference) if tokens[3] not in tokens[:3])
    workload = [
        (prompts[1], greedy(10, presence_penalty=-2.0)),
        (prompts[3], greedy(10, frequency_penalty=-2.0, min_tokens=6)),
        (prompts[5], SamplingParams(temperature=0.9, seed=2, repetition_penalty=0.5, max_tokens=10)),
        (prompts[6], greedy(10, repetition_penalty=1.8, presence_penalty=1.0, min_tokens=9)),
        (prompts[i], greedy(10, stop_token_ids=(reference[i][3],), min_tokens=3)),
    ]
    sync = setup.engine(async_scheduling=False).generate(workload)
    engine = setup.engine(async_scheduling=True)
    assert_same_outputs(engine.generate(workload), sync)
    assert sync[4][0].finish_reason == "stop" and sync[4][0].token_ids == reference[i][:4]
    assert engine.num_lookahead_steps >= 8


def test_bad_words_look_ahead(setup, prompts_and_reference):
    """Bad words of one, two and three tokens, taken from the greedy answers so that each changes
    its request's: never in the output, and the same outputs with and without look-ahead (a word's
    token before its last is compared with the token in flight on the device)."""
    prompts, reference = prompts_and_reference
    one, two, three = (reference[0][2],), tuple(reference[1][2:4]), tuple(reference[2][1:4])
    workload = [
        (prompts[0], greedy(MAX_TOKENS, bad_word_ids=(one,))),
        (prompts[1], greedy(MAX_TOKENS, bad_word_ids=(two,))),
        (prompts[2], greedy(MAX_TOKENS, bad_word_ids=(three, two))),
        (prompts[3], SamplingParams(temperature=1.5, seed=4, max_tokens=12, bad_word_ids=(two, three, one))),
        (prompts[4], greedy(MAX_TOKENS, presence_penalty=1.0, bad_word_ids=(one,))),
    ]
    sync = setup.engine(async_scheduling=False).generate(workload)
    engine = setup.engine(async_scheduling=True)
    assert_same_outputs(engine.generate(workload), sync)
    assert engine.num_lookahead_steps >= MAX_TOKENS - 2
    for (_, params), out in zip(workload, sync, strict=True):
        tokens = out[0].token_ids
        for word in params.bad_word_ids:
            assert all(tuple(tokens[j : j + len(word)]) != word for j in range(len(tokens)))
    # each greedy answer parts from the reference where its word would have ended, not before
    for i, end in ((0, 2), (1, 3), (2, 3)):
        tokens = sync[i][0].token_ids
        assert tokens[:end] == reference[i][:end] and tokens[end] != reference[i][end]


def test_finished_requests_are_forgotten_by_the_runner(setup, prompts_and_reference):
    """A look-ahead step with nothing to run must not swallow the ids of requests that just
    finished: the sampler would keep their seeded generators, and the same ids in a second
    generate() call would draw other tokens."""
    prompts, _ = prompts_and_reference
    engine = setup.engine(async_scheduling=True)
    workload = [(prompts[1], SamplingParams(temperature=1.0, seed=7, max_tokens=n, ignore_eos=True)) for n in (3, 4, 5)]
    first = [o[0].token_ids for o in engine.generate(workload)]
    assert [o[0].token_ids for o in engine.generate(workload)] == first
    engine.step()  # hands the last finished ids to the runner
    assert engine.runner.sampler.generators == {}


def test_aborts_with_a_step_in_flight(setup, prompts_and_reference):
    prompts, reference = prompts_and_reference
    engine = setup.engine(async_scheduling=True)
    for i, prompt in enumerate(prompts[:8]):
        engine.add_request(f"r{i}", prompt, greedy(MAX_TOKENS))
    finished, aborted = {}, ("r1", "r4", "r6")
    for step in range(100):
        if step == 3:
            assert engine.in_flight is not None  # the abort lands while a step is queued
            for rid in aborted:
                engine.abort(rid)
        for out in engine.step():
            assert out.request_id not in aborted or step < 3
            if out.finished:
                finished[out.request_id] = out.token_ids
        if not engine.has_unfinished:
            break
    assert set(finished) == {"r0", "r2", "r3", "r5", "r7"}
    assert all(tokens == reference[int(rid[1:])] for rid, tokens in finished.items())
    assert engine.kv.num_free_blocks == len(engine.kv.pool.blocks)


def test_preemption_and_prefix_cache_with_lookahead(setup, prompts_and_reference):
    prompts, reference = prompts_and_reference
    engine = setup.engine(num_kv_blocks=14, max_num_batched_tokens=64, async_scheduling=True)
    assert [o[0].token_ids for o in engine.generate([(p, greedy(MAX_TOKENS)) for p in prompts])] == reference
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.num_free_blocks == 14
    # blocks keyed after look-ahead steps hold the right K/V: a second run hits them, same tokens
    engine = setup.engine(async_scheduling=True)
    first = engine.generate([(prompts[0], greedy(MAX_TOKENS))])[0][0].token_ids
    hits = engine.kv.num_prefix_hits
    assert engine.generate([(prompts[0], greedy(MAX_TOKENS))])[0][0].token_ids == first == reference[0]
    assert engine.kv.num_prefix_hits > hits


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter variant; CUDA runs test_engine's CUDA test")
def test_lookahead_through_the_decode_graph_path(setup, prompts_and_reference):
    """The graph path's static buffers take the fed tokens (uncaptured on CPU, Triton attention
    in the interpreter); while every row is a look-ahead row, as they are (rows None), also
    once requests finish and the batch shrinks (the tokens of the rows left gathered first). One
    request has a two-token bad word: its second token is compared with the fed one there."""
    prompts, reference = prompts_and_reference
    engine = setup.engine(max_num_batched_tokens=64, async_scheduling=True)
    engine.runner.enable_decode_graphs(max_batch=4, max_model_len=engine.max_model_len, capture=False)
    graphs = engine.runner.decode_graphs
    run, feeds = graphs.run, []

    def recording(input_ids, positions, slots, block_tables, seq_lens, fed=None):
        if fed is not None:
            feeds.append((len(input_ids), None if fed[0] is None else fed[0].tolist(), len(fed[1])))
        return run(input_ids, positions, slots, block_tables, seq_lens, fed)

    graphs.run = recording
    picked, lengths = [0, 1, 3], [6, 5, 4]
    word = tuple(reference[5][1:3])
    workload = [(prompts[i], greedy(n)) for i, n in zip(picked, lengths, strict=True)]
    outputs = engine.generate(workload + [(prompts[5], greedy(MAX_TOKENS, bad_word_ids=(word,)))])
    assert [o[0].token_ids for o in outputs[:3]] == [reference[i][:n] for i, n in zip(picked, lengths, strict=True)]
    banned = outputs[3][0].token_ids
    assert banned[:2] == reference[5][:2] and banned[2] != reference[5][2]
    assert graphs.num_runs > 0 and engine.num_lookahead_steps > 0
    assert any(rows is None for _, rows, _ in feeds)
    assert all(rows is not None or batch == tokens for batch, rows, tokens in feeds)  # None: every row fed


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_lookahead_on_cuda_gives_the_same_outputs(tiny_checkpoint, setup, prompts_and_reference, cuda_graphs):
    """fp32 on CUDA, compiled kernels: every sampling feature, and a queue with chunked prefill,
    give the same outputs with look-ahead steps as when the tokens are read first."""
    from model.weights import load_model
    from server.engine import Engine, EngineConfig

    prompts, reference = prompts_and_reference
    model = load_model(tiny_checkpoint, torch.float32, "cuda")

    def engine(look_ahead, **config):
        return Engine(model, setup.processor, EngineConfig(num_kv_blocks=512, cuda_graphs=cuda_graphs,
                                                           async_scheduling=look_ahead, **config))  # fmt: skip

    workload, _ = every_feature(setup, prompts, reference)
    ahead = engine(True)
    assert_same_outputs(ahead.generate(workload), engine(False).generate(workload))
    assert ahead.num_lookahead_steps >= 10
    if HAS_XGRAMMAR:  # structured outputs: bitmasks from the host, sampled after a graph replay
        from tests.server.test_structured_outputs import assert_matches
        from tests.server.test_structured_outputs import workload as constrained

        requests = constrained(setup, prompts)
        outputs = engine(True).generate(requests)
        assert_same_outputs(outputs, engine(False).generate(requests))
        for (_, params), per_request in zip(requests, outputs, strict=True):
            for output in per_request if params.constraint is not None else ():
                assert output.finish_reason == "stop"
                assert_matches(params.constraint, output.text)
    queued = [(p, greedy(MAX_TOKENS)) for p in prompts]
    ahead = engine(True, max_num_seqs=4, max_num_batched_tokens=33)
    assert [o[0].token_ids for o in ahead.generate(queued)] == reference
    assert ahead.num_lookahead_steps > 0 and ahead.kv.num_free_blocks == 512


@settings(max_examples=12, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 11),  # prompt
            st.integers(1, 10),  # max_tokens
            st.sampled_from(["greedy", "seeded", "penalised", "min_tokens", "logprobs", "stop_id", "n2", "choice"]),
        ),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from([(2048, 16, 512), (9, 3, 512), (40, 6, 14)]),  # budget, max_num_seqs, KV blocks
)
def test_random_workloads_give_the_same_outputs_ahead(setup, prompts_and_reference, requests, limits):
    """Random mixes of sampling features under a large batch, a queue with small chunks, or a
    pool small enough to preempt: look-ahead changes no output."""
    prompts, reference = prompts_and_reference
    budget, max_seqs, blocks = limits
    kinds = {
        "greedy": lambda n, i: greedy(n),
        "seeded": lambda n, i: SamplingParams(temperature=1.0, top_k=20, seed=i, max_tokens=n),
        "penalised": lambda n, i: greedy(n, presence_penalty=-2.0, frequency_penalty=0.5, repetition_penalty=1.3),
        "min_tokens": lambda n, i: greedy(n, min_tokens=n // 2),
        "logprobs": lambda n, i: greedy(n, logprobs=3),
        "stop_id": lambda n, i: greedy(n, stop_token_ids=(reference[i][1],)),
        "n2": lambda n, i: SamplingParams(temperature=0.7, seed=i, n=2, max_tokens=n),
        "choice": lambda n, i: SamplingParams(temperature=1.0, seed=i, max_tokens=n, constraint=CHOICE),
    }
    workload = [(prompts[i], kinds[kind](n, i)) for i, n, kind in requests if kind != "choice" or HAS_XGRAMMAR]
    config = dict(max_num_batched_tokens=budget, max_num_seqs=max_seqs, num_kv_blocks=blocks)
    sync = setup.engine(async_scheduling=False, **config).generate(workload)
    engine = setup.engine(async_scheduling=True, **config)
    assert_same_outputs(engine.generate(workload), sync)
    assert engine.kv.num_free_blocks == blocks and not engine.has_unfinished
