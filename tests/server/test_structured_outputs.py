"""Structured output (server/grammars.py): every constrained completion matches its JSON schema,
regex, choice or grammar, on both tiny checkpoints (sentencepiece and Llama-3 byte-level
tokenizers), with and without look-ahead steps, beside unconstrained requests that keep the
reference path's tokens."""

import json
import math
import re
import sys

import pytest
import torch

from model.sampling_params import OutputConstraint, ParamError, SamplingParams
from server.grammars import MAX_CACHED_CONSTRAINTS, Grammars, choice_grammar
from tests.server.engine_helpers import MAX_TOKENS, greedy

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "blue"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["color", "count"],
    "additionalProperties": False,
}
CHOICES = ("red circle", "blue square", 'a "quoted"\nline')
REGEX = r"[0-9]{2}-[a-c]{1,3}"
GRAMMAR = 'root ::= "yes" | "no" | "maybe " [0-9]'
CONSTRAINTS = [
    OutputConstraint("json", json.dumps(SCHEMA)),
    OutputConstraint("json_object"),
    OutputConstraint("choice", CHOICES),
    OutputConstraint("regex", REGEX),
    OutputConstraint("grammar", GRAMMAR),
]
LONG = 48  # tokens a constrained completion may take: room for SCHEMA's objects in either tiny tokenizer


def assert_matches(constraint: OutputConstraint, text: str) -> None:
    if constraint.kind == "json":
        value = json.loads(text)
        assert text == json.dumps(value)  # compact, as the README says: ", " and ": ", no other whitespace
        assert set(value) == {"color", "count"} and value["color"] in ("red", "blue") and 0 <= value["count"] <= 9
    elif constraint.kind == "json_object":
        assert text == "{}"  # pushed toward "}" from the first token (close_brace_bias)
    elif constraint.kind == "choice":
        assert text in CHOICES
    elif constraint.kind == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        assert re.fullmatch(r"yes|no|maybe [0-9]", text), text


def close_brace_bias(setup) -> tuple[tuple[int, float], ...]:
    """logit_bias toward every token that reads "}": any JSON object's keys are free text, which
    a random model writes until max_tokens; pushed to close, it writes "{}" (the grammar allows
    "}" only after "{")."""
    tokenizer = setup.processor.tokenizer
    return tuple((t, 50.0) for t in range(len(tokenizer)) if tokenizer.decode([t]) == "}")


def workload(setup, prompts):
    """Each constraint greedy and seeded-sampled (n=2), beside unconstrained greedy requests."""
    requests = []
    for i, constraint in enumerate(CONSTRAINTS):
        bias = close_brace_bias(setup) if constraint.kind == "json_object" else ()
        requests.append((prompts[i], greedy(LONG, constraint=constraint, logit_bias=bias)))
        requests.append((prompts[i + 5], SamplingParams(temperature=1.0, seed=i, n=2, max_tokens=LONG,
                                                        constraint=constraint, logit_bias=bias)))  # fmt: skip
    return requests + [(p, greedy(MAX_TOKENS)) for p in prompts[:4]]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "look-ahead"])
def test_constrained_completions_match_and_leave_the_others_alone(setup, prompts_and_reference, async_scheduling):
    prompts, reference = prompts_and_reference
    engine = setup.engine(async_scheduling=async_scheduling)
    constrained_ahead = 0
    forward = engine.runner.forward

    def recording(out, feed=None):
        nonlocal constrained_ahead
        constrained_ahead += feed is not None and any(s.seq.request_id in engine.matchers for s in out.scheduled)
        return forward(out, feed)

    engine.runner.forward = recording
    requests = workload(setup, prompts)
    outputs = engine.generate(requests)
    for (_, params), per_request in zip(requests, outputs, strict=True):
        for output in per_request:
            if params.constraint is None:
                continue
            # a complete text ends with the grammar's stop token, never at max_tokens
            assert output.finish_reason == "stop", (params.constraint.kind, output.text)
            assert_matches(params.constraint, output.text)
    assert [o[0].token_ids for o in outputs[-4:]] == reference[:4]
    assert not engine.matchers and not engine.has_unfinished
    assert engine.kv.num_free_blocks == len(engine.kv.pool.blocks)
    if async_scheduling:  # the path that reads the tokens in flight before sampling ran
        assert constrained_ahead > 10


def test_look_ahead_changes_no_constrained_token(setup, prompts_and_reference):
    prompts, _ = prompts_and_reference
    requests = workload(setup, prompts)
    runs = [setup.engine(async_scheduling=a).generate(requests) for a in (False, True)]
    assert [[o.token_ids for o in r] for r in runs[0]] == [[o.token_ids for o in r] for r in runs[1]]


def test_min_tokens_yields_to_a_complete_text(setup, prompts_and_reference):
    """A choice is complete before min_tokens: the grammar then allows only a stop token, which
    min_tokens would mask too (leaving nothing). The grammar wins: the text stops, complete."""
    prompts, _ = prompts_and_reference
    params = greedy(LONG, min_tokens=LONG - 1, constraint=OutputConstraint("choice", ("yes", "no")))
    (output,) = setup.engine().generate([(prompts[0], params)])[0]
    assert output.text in ("yes", "no") and output.finish_reason == "stop" and len(output.token_ids) < 8


def test_aborting_and_finishing_drop_the_matchers(setup, prompts_and_reference):
    prompts, _ = prompts_and_reference
    engine = setup.engine(async_scheduling=True)
    constraint = OutputConstraint("json", json.dumps(SCHEMA))
    engine.add_request("kept", prompts[0], greedy(LONG, constraint=constraint))
    engine.add_request("aborted", prompts[1], SamplingParams(n=2, max_tokens=LONG, constraint=constraint))
    assert set(engine.matchers) == {"kept#0", "aborted#0", "aborted#1"}
    for _ in range(3):
        engine.step()
    engine.abort("aborted")
    assert set(engine.matchers) == {"kept#0"}
    while engine.has_unfinished:
        engine.step()
    assert not engine.matchers


@pytest.mark.parametrize(
    "constraint, message",
    [
        (OutputConstraint("json", "{not json"), "invalid JSON schema: Failed to parse JSON"),
        (OutputConstraint("json", '{"type": "strange"}'), 'invalid JSON schema: Unsupported type "strange"'),
        (OutputConstraint("regex", "(("), "invalid regex: Regex parsing error"),
        (OutputConstraint("grammar", "root ::= "), "invalid grammar: EBNF parser error"),
    ],
)
def test_an_invalid_spec_is_refused_before_anything_is_added(setup, prompts_and_reference, constraint, message):
    prompts, _ = prompts_and_reference
    engine = setup.engine()
    with pytest.raises(ParamError, match=re.escape(message)) as err:
        engine.add_request("r", prompts[0], greedy(4, constraint=constraint))
    assert err.value.field == "structured_outputs" and "/project/" not in str(err.value)
    assert not engine.has_unfinished and not engine.matchers


def test_without_xgrammar_a_constraint_is_refused_by_name(setup, monkeypatch):
    grammars = Grammars(setup.processor.tokenizer, setup.model.config.vocab_size, setup.model.config.eos_token_ids)
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar: ImportError
    assert not grammars.prepare()  # the server starts all the same, and says so
    with pytest.raises(ParamError, match=r"pip install 'cogserve\[structured\]'") as err:
        grammars.compile(OutputConstraint("regex", "a+", "guided_regex"))
    assert err.value.field == "guided_regex"


def test_prepare_reads_the_vocabulary_once(setup):
    grammars = Grammars(setup.processor.tokenizer, setup.model.config.vocab_size, setup.model.config.eos_token_ids)
    assert grammars.prepare()
    compiler = grammars._compiler
    assert compiler is not None and grammars.prepare() and grammars._compiler is compiler
    first = grammars.compile(OutputConstraint("regex", "a+"))
    assert grammars._compiler is compiler
    # the engine thread's compile of what the HTTP handler compiled is a lookup, not a conversion
    assert grammars.compile(OutputConstraint("regex", "a+")) is first
    for i in range(MAX_CACHED_CONSTRAINTS):
        grammars.compile(OutputConstraint("regex", f"b{{{i + 1}}}"))
    assert len(grammars._compiled) == MAX_CACHED_CONSTRAINTS
    assert OutputConstraint("regex", "a+") not in grammars._compiled  # the least recently used went


def test_choice_grammar_escapes_quotes_newlines_and_backslashes(setup):
    grammars = Grammars(setup.processor.tokenizer, setup.model.config.vocab_size, setup.model.config.eos_token_ids)
    choices = ('say "hi"', "a\\b", "two\nlines", "ünï")
    assert choice_grammar(choices).startswith('root ::= "say \\"hi\\""')
    for choice in choices:
        matcher = grammars.matcher(OutputConstraint("choice", choices))
        assert matcher.accept_string(choice), choice
        assert matcher.accept_token(setup.model.config.eos_token_ids[0]) and matcher.is_terminated()
    assert not grammars.matcher(OutputConstraint("choice", choices)).accept_string('say "ho"')
    prefix = grammars.matcher(OutputConstraint("choice", choices))
    assert prefix.accept_string('say "hi') and not prefix.accept_token(setup.model.config.eos_token_ids[0])


def test_constraint_validation():
    with pytest.raises(ParamError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, constraint=OutputConstraint("regex", "a"))
    for bad in [OutputConstraint("yaml", "a"), OutputConstraint("choice", ()), OutputConstraint("choice", ("",)),
                OutputConstraint("regex", " "), OutputConstraint("json", "")]:  # fmt: skip
        with pytest.raises(ParamError):
            SamplingParams(constraint=bad)


def test_bitmask_rows_are_applied_bit_for_bit(setup):
    """The sampler reads word w's bit t as token 32 w + t, bit 31 (the int32 sign bit) included,
    on the rows given and no others."""
    from model.batch import SequenceData
    from model.sampler import Sampler

    vocab = 100
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    allowed = [[31, 63, 64, 99], [0, 32, 95]]
    bits = torch.zeros(2, 4, dtype=torch.int64)
    for row, ids in enumerate(allowed):
        for t in ids:
            bits[row, t // 32] |= 1 << (t % 32)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # as xgrammar's int32 words
    prompt = setup.prompts(1)[0]
    seqs = [SequenceData(f"r{i}", prompt, greedy(4)) for i in range(3)]
    sampled = Sampler((2,)).sample(logits, seqs, grammar_mask=([2, 0], bits)).tokens.tolist()
    assert sampled[2] == max(allowed[0], key=lambda t: logits[2, t])
    assert sampled[0] == max(allowed[1], key=lambda t: logits[0, t])
    assert sampled[1] == logits[1].argmax().item()


def test_logprobs_are_over_the_tokens_the_grammar_allows(setup, prompts_and_reference):
    """As vLLM's: the grammar's mask comes before the logprobs, so a guided choice's logprobs are
    its options' probabilities (what a classifier reads), not the unconstrained model's."""
    prompts, _ = prompts_and_reference
    constraint = OutputConstraint("choice", CHOICES)
    (output,) = setup.engine().generate([(prompts[0], greedy(LONG, logprobs=20, constraint=constraint))])[0]
    cfg = setup.model.config
    grammars = Grammars(setup.processor.tokenizer, cfg.vocab_size, cfg.eos_token_ids)
    bits = grammars.bitmask([grammars.matcher(constraint)])
    allowed = {t for t in range(cfg.vocab_size) if (bits[0, t // 32].item() >> (t % 32)) & 1}
    first = output.new_logprobs[0]
    finite = {t: lp for t, lp in first.top_logprobs if lp > float("-inf")}
    assert 1 < len(allowed) <= 20 and set(finite) == allowed
    assert sum(math.exp(lp) for lp in finite.values()) == pytest.approx(1.0, abs=1e-4)
    assert first.logprob == finite[output.token_ids[0]] == max(finite.values())  # greedy: the likeliest option


def test_a_choice_may_start_with_the_models_own_first_token(setup, prompts_and_reference):
    """The tokens a tokenizer gives a choice's text are the ones a model answers with. Sentencepiece
    (cogvlm) writes the leading space into the first ("▁red"), which xgrammar reads as " red" and
    decoding drops: the grammar allows that space, and the text still reads exactly the choice."""
    prompts, _ = prompts_and_reference
    choices = ("red circle", "blue square")
    first = [setup.processor.tokenizer.encode(c, add_special_tokens=False)[0] for c in choices]
    for choice, token in zip(choices, first, strict=True):
        params = greedy(LONG, constraint=OutputConstraint("choice", choices), logit_bias=((token, 100.0),))
        (output,) = setup.engine().generate([(prompts[0], params)])[0]
        assert output.token_ids[0] == token and output.text == choice and output.finish_reason == "stop"
