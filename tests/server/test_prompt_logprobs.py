"""vLLM's prompt_logprobs: each prompt token's logprob given the tokens before it, its rank and
the K likeliest tokens there, equal to one whole-prompt forward of the model, however the prompt
is chunked, batched, looked ahead of or preempted."""

import pytest
import torch

from model.attention import ContiguousKVCache
from model.processor import vision_expert_mask
from model.sampling_params import ParamError, SamplingParams
from tests.server.engine_helpers import MAX_TOKENS, greedy


@torch.inference_mode()
def whole_prompt_logprobs(model, prompt) -> torch.Tensor:  # [P - 1, V]: position p predicts token p + 1
    device = model.device
    ids = torch.tensor(prompt.input_ids, device=device)
    features = rows = None
    if prompt.pixels is not None:
        features = model.encode_images(prompt.pixels[None].to(device))[0]
        rows = torch.tensor(prompt.image_slots, device=device)
    mask = vision_expert_mask(prompt.token_type_ids)
    cfg = model.config
    cache = ContiguousKVCache(cfg.num_layers, len(ids), cfg.num_kv_heads, cfg.head_dim, model.dtype, device)
    hidden = model(model.embed(ids, features, rows), torch.tensor(prompt.position_ids, device=device),
                   torch.tensor(mask, device=device) if any(mask) else None, cache)  # fmt: skip
    return torch.log_softmax(model.compute_logits(hidden[:-1]), dim=-1)


def assert_matches_whole_prompt(setup, prompt, entries, k):
    expected = whole_prompt_logprobs(setup.model, prompt)
    slots = set(prompt.image_slots)
    assert len(entries) == prompt.num_tokens and entries[0] is None
    for position, entry in enumerate(entries[1:], start=1):
        if position in slots:  # a placeholder the vision features replace: nothing to say of it
            assert entry is None
            continue
        row = expected[position - 1]
        token = prompt.input_ids[position]
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry.rank == int((row > row[token]).sum()) + 1
        assert [t for t, _ in entry.top_logprobs] == row.topk(k).indices.tolist()
        assert [v for _, v in entry.top_logprobs] == pytest.approx(row.topk(k).values.tolist(), abs=1e-4)


@pytest.mark.parametrize("budget", [7, 2048])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "look-ahead"])
def test_prompt_logprobs_equal_a_whole_prompt_forward(setup, prompts_and_reference, budget, async_scheduling):
    """Image and text prompts, chunked at 7 tokens or whole, beside requests that do not ask: the
    answers stay the reference path's."""
    prompts, reference = prompts_and_reference
    engine = setup.engine(max_num_batched_tokens=budget, async_scheduling=async_scheduling)
    ks = [0, 3, 20, 1]
    asking = [(prompts[i], greedy(MAX_TOKENS, prompt_logprobs=k)) for i, k in enumerate(ks)]
    outputs = engine.generate(asking + [(p, greedy(MAX_TOKENS)) for p in prompts[4:8]])
    for i, k in enumerate(ks):
        assert_matches_whole_prompt(setup, prompts[i], outputs[i][0].prompt_logprobs, k)
    assert all(o[0].prompt_logprobs is None for o in outputs[4:])
    assert [o[0].token_ids for o in outputs] == reference[:8]
    assert not engine.prompt_logprobs and engine.kv.num_free_blocks == len(engine.kv.pool.blocks)


def test_prompt_logprobs_skip_the_prefix_cache_and_survive_preemption(setup, prompts_and_reference):
    """The same image prompt twice: the second asks for prompt logprobs, so it computes its whole
    prompt rather than take the first's cached blocks. A pool small enough to preempt."""
    prompts, reference = prompts_and_reference
    image_prompt = next(p for p in prompts if p.pixels is not None)
    engine = setup.engine()
    engine.generate([(image_prompt, greedy(2))])
    hits = engine.kv.num_prefix_hits
    (output,) = engine.generate([(image_prompt, greedy(2, prompt_logprobs=2))])[0]
    assert engine.kv.num_prefix_hits == hits
    assert_matches_whole_prompt(setup, image_prompt, output.prompt_logprobs, 2)
    tight = setup.engine(num_kv_blocks=14, max_num_batched_tokens=64)
    outputs = tight.generate([(p, greedy(MAX_TOKENS, prompt_logprobs=1)) for p in prompts[:8]])
    assert tight.scheduler.num_preemptions > 0 and not tight.prompt_logprobs  # recomputes add none
    for prompt, per_request, tokens in zip(prompts[:8], outputs, reference, strict=False):
        assert_matches_whole_prompt(setup, prompt, per_request[0].prompt_logprobs, 1)
        assert per_request[0].token_ids == tokens


def test_every_completion_of_n_gets_them_and_aborts_drop_them(setup, prompts_and_reference):
    prompts, _ = prompts_and_reference
    engine = setup.engine(max_num_batched_tokens=7)
    outputs = engine.generate([(prompts[1], SamplingParams(n=2, seed=1, max_tokens=3, prompt_logprobs=0))])[0]
    for output in outputs:
        assert_matches_whole_prompt(setup, prompts[1], output.prompt_logprobs, 0)
    engine.add_request("gone", prompts[3], greedy(4, prompt_logprobs=2))  # text only: every row has one
    engine.step()  # a first chunk of 7 tokens: some prompt logprobs read
    assert engine.prompt_logprobs
    engine.abort("gone")
    assert not engine.prompt_logprobs


def test_prompt_logprobs_range():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ParamError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


def test_one_token_chunks_through_the_decode_graphs(setup, prompts_and_reference):
    """A budget of one token sends each prompt token through the decode graph path (uncaptured on
    CPU), whose logits cover every row: the prompt logprobs come from there."""
    prompts, _ = prompts_and_reference
    prompt = prompts[3]  # text only, short
    engine = setup.engine(max_num_batched_tokens=1)
    engine.runner.enable_decode_graphs(max_batch=1, max_model_len=engine.max_model_len, capture=False)
    runs, original = [], engine.runner.decode_graphs.run
    engine.runner.decode_graphs.run = lambda *args: runs.append(1) or original(*args)
    (output,) = engine.generate([(prompt, greedy(1, prompt_logprobs=3))])[0]
    assert len(runs) >= prompt.num_tokens
    assert_matches_whole_prompt(setup, prompt, output.prompt_logprobs, 3)
