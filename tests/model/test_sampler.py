import math

import pytest
import torch

from model.batch import SequenceData
from model.processor import PromptInputs
from model.sampler import Sampler
from model.sampling_params import ParamError, SamplingParams


def seq(request_id="r", prompt_ids=(1, 2), output_ids=(), **params):
    prompt = PromptInputs(list(prompt_ids), [0] * len(prompt_ids), list(range(len(prompt_ids))))
    return SequenceData(request_id, prompt, SamplingParams(**params), list(output_ids))


def sample(logits, *seqs, eos=(0,)):
    return Sampler(eos)(logits, list(seqs))


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = torch.randn(5, 50)
    best = logits.argmax(-1).tolist()
    seqs = [seq(temperature=0.0), seq(top_k=1), seq(top_p=1e-6), seq(min_p=1.0), seq(temperature=0.0, top_k=3)]
    assert [t.token_id for t in sample(logits, *seqs)] == best


def test_logits_are_copied_only_for_a_row_that_edits_them(monkeypatch):
    """Penalties, logit_bias and min_tokens edit a copy (the caller's logits stay as they were);
    a batch with none of them reads the logits as they are: one copy fewer a decode step."""
    copies = []
    clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: copies.append(t.shape) or clone(t, *a, **k))
    logits = torch.randn(3, 50)
    kept = logits.clone()
    copies.clear()
    plain = [seq(temperature=0.0), seq(temperature=0.0, output_ids=(5,)), seq(top_k=3, seed=1)]
    sample(logits, *plain)
    assert copies == []
    for edits in (dict(repetition_penalty=1.5), dict(logit_bias=((7, 100.0),)), dict(min_tokens=2),
                  dict(allowed_token_ids=(7,)), dict(bad_word_ids=((int(logits[2].argmax()),),))):  # fmt: skip
        picked = sample(logits, *plain[:2], seq(temperature=0.0, output_ids=(7,), **edits))
        assert copies == [logits.shape] and torch.equal(logits, kept)
        copies.clear()
        if "logit_bias" in edits or "allowed_token_ids" in edits:
            assert picked[2].token_id == 7  # the edit reached the sampled row
    assert [t.token_id for t in sample(logits[:2], *plain[:2])] == logits[:2].argmax(-1).tolist()


def test_top_k_and_top_p_only_ever_pick_allowed_tokens():
    logits = torch.tensor([[3.0, 2.9, 2.8, -5.0, -5.0, -5.0]])
    for i in range(60):
        (k2,) = sample(logits, seq(f"a{i}", top_k=2, temperature=2.0))
        assert k2.token_id in (0, 1)
        probs = torch.softmax(logits[0], -1)
        (p,) = sample(logits, seq(f"b{i}", top_p=float(probs[0] + probs[1] / 2), temperature=1.0))
        assert p.token_id in (0, 1)  # the smallest prefix reaching top_p holds two tokens


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = torch.zeros(3)
    for i in range(2000):
        (t,) = sample(logits, seq(f"s{i}"))
        counts[t.token_id] += 1
    assert torch.allclose(counts / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_penalties_follow_the_openai_and_vllm_formulas():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    s = seq(prompt_ids=(0,), output_ids=(2, 2, 3), repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = logits.clone()
    Sampler._apply_penalties(out, [s])
    # token 0 (prompt): 2 / 2; token 1 unseen; token 2: 1 / 2 - 2 * 0.5 - 0.25; token 3: 0.5 / 2 - 0.5 - 0.25
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, -0.75, -0.5]]))
    negative = torch.tensor([[-1.0, 0.0]])
    Sampler._apply_penalties(negative, [seq(prompt_ids=(0,), repetition_penalty=2.0)])
    assert negative[0, 0] == -2.0  # negative logits are multiplied


def test_a_token_in_flight_counts_as_generated():
    """Look-ahead rows: the token the previous step sampled is on the device, not yet in
    output_token_ids; penalties and min_tokens must see it all the same."""
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    params = dict(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    known = logits.clone()
    Sampler._apply_penalties(known, [seq(prompt_ids=(0,), output_ids=(2, 3), **params)])
    ahead = logits.clone()
    Sampler._apply_penalties(ahead, [seq(prompt_ids=(0,), output_ids=(2,), **params)], torch.tensor([3]))
    torch.testing.assert_close(ahead, known)
    none_in_flight = logits.clone()
    Sampler._apply_penalties(none_in_flight, [seq(prompt_ids=(0,), output_ids=(2,), **params)], torch.tensor([-1]))
    assert not torch.equal(none_in_flight, known)  # -1: no token in flight, nothing counted
    s = seq(output_ids=(7,), temperature=0.0, min_tokens=2)
    eos_first = torch.tensor([[5.0, 0.0, 4.0]])
    assert Sampler((0,)).sample(eos_first, [s]).to_host()[0].token_id == 2  # 1 generated < 2: eos masked
    assert Sampler((0,)).sample(eos_first, [s], in_flight=[True]).to_host()[0].token_id == 0  # 2 with the one in flight


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[5.0, 0.0, 4.0, 1.0]])  # eos 0 best, stop id 2 next
    (t,) = sample(logits, seq(temperature=0.0, min_tokens=2, stop_token_ids=(2,)), eos=(0,))
    assert t.token_id == 3
    (t,) = sample(logits, seq(output_ids=(7, 7), temperature=0.0, min_tokens=2, stop_token_ids=(2,)), eos=(0,))
    assert t.token_id == 0


def test_logprobs_are_the_raw_model_distribution():
    logits = torch.randn(1, 30)
    (t,) = sample(logits, seq(temperature=0.0, logprobs=5, repetition_penalty=1.5))
    raw = torch.log_softmax(logits[0], -1)
    assert t.logprob == pytest.approx(float(raw[t.token_id]))
    assert [i for i, _ in t.top_logprobs] == raw.topk(5).indices.tolist()
    assert all(math.isclose(lp, float(raw[i]), rel_tol=1e-6) for i, lp in t.top_logprobs)


def test_seeded_rows_do_not_depend_on_their_neighbours():
    logits = torch.randn(4, 100)
    sampler_a, sampler_b = Sampler((0,)), Sampler((0,))
    alone = [sampler_a(logits[2:3], [seq("x", seed=5, temperature=1.3)])[0].token_id for _ in range(10)]
    crowd = []
    for _ in range(10):
        rows = [seq("o1"), seq("o2"), seq("x", seed=5, temperature=1.3), seq("o3", seed=9)]
        crowd.append(sampler_b(logits, rows)[2].token_id)
    assert alone == crowd and len(set(alone)) > 1


@pytest.mark.parametrize(
    "bad, name",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 0}, "n"),
        ({"stop": ("",)}, "stop"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        # each of these once reached the engine's step and stopped it for every request
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        # NaN passes every range comparison the wrong way; infinities make the logits NaN
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"repetition_penalty": math.nan}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": math.nan}, "min_p"),
        ({"max_tokens": True}, "max_tokens"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
        ({"logit_bias": ((5, 100.5),)}, "logit_bias"),
        ({"logit_bias": ((5, math.nan),)}, "logit_bias"),
        ({"allowed_token_ids": ()}, "allowed_token_ids"),  # vLLM refuses an empty list too
        ({"allowed_token_ids": (3, -1)}, "allowed_token_ids"),
        ({"allowed_token_ids": (3, 1.0)}, "allowed_token_ids"),
    ],
)
def test_every_parameter_is_validated_with_its_name(bad, name):
    with pytest.raises(ParamError, match=f"^{name} must be"):
        SamplingParams(**bad)


def test_the_extremes_of_every_range_sample():
    """What validation lets through must not fail in the sampler: seeds at both ends of int64
    (torch's generator takes them), a top_k and stop ids past int64 (a top_k past the vocabulary
    keeps every token; such a stop id never comes), a temperature of 1e-4 (raised to 0.01, as vLLM
    does). A top_k of 1e30 once stopped the engine: it was converted to an int64 tensor."""
    logits = torch.randn(5, 50) * 30
    rows = [seq("a", seed=2**63 - 1), seq("b", seed=-(2**63)), seq("c", top_k=10**30), seq("d", temperature=1e-4),
            seq("e", min_tokens=3, stop_token_ids=(10**30,))]  # fmt: skip
    tokens = [t.token_id for t in sample(logits, *rows)]
    assert all(0 <= t < 50 for t in tokens)
    assert tokens[3] == logits[3].argmax().item()  # 30 / 0.01 apart: the best token, not NaN's index 0
    assert seq(temperature=1e-6).params.is_greedy and not seq(temperature=1e-4).params.is_greedy


def test_logit_bias_is_added_to_the_logits_of_its_row_only():
    logits = torch.randn(3, 40)
    worst = int(logits[1].argmin())
    rows = [seq("a", temperature=0), seq("b", temperature=0, logit_bias=((worst, 100.0),)),
            seq("c", temperature=0, logit_bias=((int(logits[2].argmax()), -100.0),))]  # fmt: skip
    tokens = [t.token_id for t in sample(logits, *rows)]
    assert tokens[0] == logits[0].argmax().item()
    assert tokens[1] == worst  # greedy rows follow the bias too
    assert tokens[2] == logits[2].topk(2).indices[1].item()  # the best token banned: the second best
    for i in range(20):  # sampled rows: a token biased by -100 never comes up
        (t,) = sample(logits[:1], seq(f"s{i}", temperature=5.0, logit_bias=tuple((j, -100.0) for j in range(39))))
        assert t.token_id == 39
    # logprobs stay the raw model's, as vLLM's
    (biased,) = sample(logits[1:2], seq("l", temperature=0, logprobs=0, logit_bias=((worst, 100.0),)))
    assert biased.logprob == pytest.approx(torch.log_softmax(logits[1], -1)[worst].item(), abs=1e-5)


def test_allowed_token_ids_keep_every_other_token_out_of_its_row_only():
    logits = torch.randn(3, 40)
    allowed = tuple(int(i) for i in logits[1].topk(40).indices[-3:])  # the three worst tokens of row 1
    rows = [seq("a", temperature=0), seq("b", temperature=0, allowed_token_ids=allowed),
            seq("c", temperature=0, allowed_token_ids=(int(logits[2].argmax()),))]  # fmt: skip
    tokens = [t.token_id for t in sample(logits, *rows)]
    assert tokens[0] == logits[0].argmax().item()  # the row beside them is untouched
    assert tokens[1] == allowed[0]  # greedy: the best of the allowed ones
    assert tokens[2] == logits[2].argmax().item()
    sampler = Sampler((0,))
    hot = [sampler(logits[1:2] * 0, [seq("s", temperature=5.0, allowed_token_ids=allowed)])[0].token_id
           for _ in range(60)]  # fmt: skip
    assert set(hot) == set(allowed)  # sampled rows draw among all of them, and nothing else
    # with a logit_bias of +100 on a token it rules out, and penalties: still only the allowed ones
    row = seq("p", temperature=0, output_ids=allowed * 3, repetition_penalty=2.0, frequency_penalty=2.0,
              allowed_token_ids=allowed, logit_bias=((int(logits[1].argmax()), 100.0),))  # fmt: skip
    assert sample(logits[1:2], row)[0].token_id in allowed
    # logprobs stay the raw model's, as vLLM's
    (t,) = sample(logits[1:2], seq("l", temperature=0, logprobs=2, allowed_token_ids=allowed))
    raw = torch.log_softmax(logits[1], -1)
    assert t.logprob == pytest.approx(raw[allowed[0]].item(), abs=1e-5)
    assert [i for i, _ in t.top_logprobs] == raw.topk(2).indices.tolist()


def test_min_tokens_masks_stop_tokens_among_the_allowed_ones():
    logits = torch.zeros(1, 20)
    logits[0, 0] = 10.0  # eos (0) is by far the best
    row = seq("m", temperature=0, min_tokens=2, allowed_token_ids=(0, 9))
    assert sample(logits, row)[0].token_id == 9  # eos masked until 2 tokens: the other allowed one
    done = seq("d", temperature=0, min_tokens=2, output_ids=(9, 9), allowed_token_ids=(0, 9))
    assert sample(logits, done)[0].token_id == 0


def test_the_allowed_mask_follows_a_reused_request_id():
    """The sampler keeps each request's mask on the device; a request id used again (after its
    first request finished) with other allowed ids gets a new one, forgotten or not."""
    sampler = Sampler((0,))
    logits = torch.randn(1, 30)
    assert sampler(logits, [seq("x", temperature=0, allowed_token_ids=(4,))])[0].token_id == 4
    assert sampler(logits, [seq("x", temperature=0, allowed_token_ids=(11,))])[0].token_id == 11
    sampler.forget("x")
    assert "x" not in sampler.disallowed
    assert sampler(logits, [seq("x", temperature=0)])[0].token_id == logits.argmax().item()


@pytest.mark.parametrize(
    "params, field",
    [
        (dict(allowed_token_ids=(3, 50)), "allowed_token_ids"),  # past the 50-token vocabulary
        (dict(logit_bias=((50, 1.0),)), "logit_bias"),
        (dict(allowed_token_ids=(0,), min_tokens=1), "allowed_token_ids"),  # only eos, which min_tokens masks
        (dict(allowed_token_ids=(0, 7), min_tokens=1, stop_token_ids=(7,)), "allowed_token_ids"),
    ],
)
def test_what_needs_the_model_is_checked_against_it(params, field):
    with pytest.raises(ParamError) as err:
        SamplingParams(**params).check_model(50, (0,))
    assert err.value.field == field


def test_allowed_stop_tokens_are_fine_without_min_tokens_or_with_ignore_eos():
    SamplingParams(allowed_token_ids=(0,)).check_model(50, (0,))
    SamplingParams(allowed_token_ids=(0,), min_tokens=1, ignore_eos=True).check_model(50, (0,))
    SamplingParams(allowed_token_ids=(0, 7), min_tokens=1).check_model(50, (0,))


def test_a_bad_words_last_token_is_masked_where_the_output_ends_with_the_rest():
    logits = torch.arange(20, dtype=torch.float32).repeat(4, 1)  # token 19 best, then 18, 17, ...
    words = ((19,), (3, 18), (4, 5, 17))

    def picked(output_ids, words=words):
        return sample(logits[:1], seq("w", temperature=0, output_ids=output_ids, bad_word_ids=words))[0].token_id

    assert picked(()) == 18  # one-token word: always
    assert picked((3,)) == 17  # after 3: 18 too
    assert picked((3, 1)) == 18  # 3 is not the last token: 18 is fine
    assert picked((4, 5)) == 18 and picked((9, 4, 5, 3)) == 17
    assert picked((4, 5, 3)) == 17 and picked((4, 5), words=((4, 5, 17), (3, 18))) == 19
    assert picked((1, 4, 5), words=((4, 5, 19), (4, 5, 18))) == 17  # two words after the same tokens
    # the row beside it is untouched
    tokens = sample(logits[:2], seq("a", temperature=0), seq("b", temperature=0, bad_word_ids=words))
    assert [t.token_id for t in tokens] == [19, 18]


def test_bad_words_after_the_token_in_flight_are_checked_on_the_device():
    """A look-ahead row's newest token is not in output_token_ids yet: the word's token before its
    last is compared with the token in flight, and the output on the host checks the rest."""
    logits = torch.arange(20, dtype=torch.float32).repeat(4, 1)
    words = ((3, 19), (6, 19), (4, 5, 19))  # 19 after 3, after 6, and after 4, 5
    rows = [seq(f"r{i}", temperature=0, output_ids=out, bad_word_ids=words)
            for i, out in enumerate([(1,), (1,), (4,), (2,)])]  # fmt: skip
    in_flight_tokens = torch.tensor([3, 6, 5, 5])  # row 3: 5 in flight, but 2 before it, not 4
    batch = Sampler((0,)).sample(logits, rows, [True] * 4, in_flight_tokens).to_host()
    assert [t.token_id for t in batch] == [18, 18, 18, 19]
    # the same rows with the token in flight already in their output: the same picks
    settled = [seq(f"s{i}", temperature=0, output_ids=(*r.output_token_ids, int(t)), bad_word_ids=words)
               for i, (r, t) in enumerate(zip(rows, in_flight_tokens, strict=True))]  # fmt: skip
    assert [t.token_id for t in sample(logits, *settled)] == [18, 18, 18, 19]


@pytest.mark.parametrize(
    "params, field",
    [
        (dict(bad_word_ids=((),)), "bad_words"),
        (dict(bad_word_ids=((3, -1),)), "bad_words"),
    ],
)
def test_bad_words_are_validated(params, field):
    with pytest.raises(ParamError) as err:
        SamplingParams(**params)
    assert err.value.field == field


def test_bad_words_are_checked_against_the_model():
    with pytest.raises(ParamError) as err:
        SamplingParams(bad_word_ids=((3, 50),)).check_model(50, (0,))
    assert err.value.field == "bad_words"
    with pytest.raises(ParamError, match="rules out every token"):
        SamplingParams(allowed_token_ids=(3, 4), bad_word_ids=((3,), (4,))).check_model(50, (0,))
    with pytest.raises(ParamError, match="min_tokens"):
        SamplingParams(allowed_token_ids=(0, 4), bad_word_ids=((4,),), min_tokens=2).check_model(50, (0,))
    SamplingParams(allowed_token_ids=(3, 4), bad_word_ids=((3,), (9, 4))).check_model(50, (0,))  # 4 only after 9


EDGE_FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-30, 1e-4, 1e308]
EDGE_INTS = [-2, -1, 0, 1, 10**6, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, 10**30]
EDGES = {
    "temperature": EDGE_FLOATS, "top_p": EDGE_FLOATS, "min_p": EDGE_FLOATS, "presence_penalty": EDGE_FLOATS,
    "frequency_penalty": EDGE_FLOATS, "repetition_penalty": EDGE_FLOATS, "top_k": EDGE_INTS, "seed": EDGE_INTS,
    "min_tokens": EDGE_INTS, "logprobs": EDGE_INTS, "stop_token_ids": [(v,) for v in EDGE_INTS],
    "logit_bias": [((3, v),) for v in EDGE_FLOATS] + [((v, 1.0),) for v in EDGE_INTS],
    "allowed_token_ids": [(v,) for v in EDGE_INTS] + [(5,), (5, 3)],
    "bad_word_ids": [((v,),) for v in EDGE_INTS] + [((3, v),) for v in EDGE_INTS],
}  # fmt: skip


@pytest.mark.parametrize("name, value", [(name, v) for name, values in EDGES.items() for v in values])
def test_what_validation_accepts_samples(name, value):
    """Validation and the sampler agree: a value either raises ParamError (a 400) or samples a token
    in the vocabulary, next to a sampled row (temperature 1, top_p 0.9, a seed). A seed past int64 and
    a top_k of 1e30 once passed validation and then raised in the engine's step, stopping it for all.
    Validation here is the engine's: the parameters' own, then check_model's (vocabulary, eos 0)."""
    base = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "min_tokens": 3, "stop_token_ids": (5,)}
    try:
        row = seq("edge", output_ids=(3, 3), **{**base, name: value})
        row.params.check_model(50, (0,))
    except ParamError:
        return
    tokens = sample(torch.randn(2, 50) * 10, row, seq("other", temperature=0.7, top_k=5))
    assert all(0 <= t.token_id < 50 for t in tokens)
