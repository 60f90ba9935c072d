"""POST /v1/completions (server/completions.py), through raw HTTP and the official `openai`
client, on both tiny generations (sentencepiece and Llama-3 byte-level tokenizers)."""

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch

from model.generation import GenerationParams, generate_reference
from server.completions import merged
from server.config import ServeConfig, ServerConfig
from server.detokenizer import IncrementalDetokenizer
from tests.server.live_server import MODEL_NAME, running_engine, serve, wait_until
from tests.server.test_api import assert_error, metric
from tests.server.test_prompt_logprobs import whole_prompt_logprobs

PROMPTS = ["The circle is", "Two plus two", "A"]


@pytest.fixture(scope="module", params=[1, 2], ids=["cogvlm", "cogvlm2"])
def live(request, tiny_checkpoints):
    # look-ahead steps, as CUDA serves by default
    folder = tiny_checkpoints[request.param]
    with (
        running_engine(folder, async_scheduling=True) as (model, processor, engine),
        serve(ServeConfig(), engine, processor) as server,
    ):
        server.model, server.processor, server.engine = model, processor, engine
        yield server


def complete(live, **fields) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/completions", json={"model": MODEL_NAME, **fields}, timeout=60)


def completed(live, **fields) -> dict:
    response = complete(live, **fields)
    assert response.status_code == 200, response.text
    return response.json()


def reference(live, ids: list[int], max_tokens: int) -> list[int]:
    inputs = live.processor.build_token_ids(ids)
    return generate_reference(live.model, inputs, GenerationParams(max_tokens=max_tokens)).output_token_ids


def token_ids(choice: dict) -> list[int]:
    """A choice's tokens, asked for with logprobs=0 and return_tokens_as_token_ids."""
    return [int(token.removeprefix("token_id:")) for token in choice["logprobs"]["tokens"]]


def text_of(live, tokens: list[int]) -> str:
    """As the engine writes them, a token at a time: a random model's bytes are often not UTF-8,
    and a whole decode replaces every byte of such a run, where the stream has let the valid
    ones out already (vLLM's way too)."""
    detokenizer = IncrementalDetokenizer(live.processor.tokenizer)
    for token in tokens:
        detokenizer.add([token])
    detokenizer.flush()
    return detokenizer.text


def tokenized(live, prompt: str, bos: bool = True) -> list[int]:
    response = httpx.post(f"{live.url}/tokenize", json={"prompt": prompt, "add_special_tokens": bos})
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_a_text_prompt_is_bos_and_its_tokens_and_answers_as_the_reference(live):
    body = completed(live, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=0, return_tokens_as_token_ids=True)
    ids = tokenized(live, PROMPTS[0])
    tokenizer = live.processor.tokenizer
    assert ids == [live.processor.cfg.bos_token_id] + tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    assert tokenized(live, PROMPTS[0], bos=False) == ids[1:]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    expected = reference(live, ids, 6)
    assert token_ids(choice) == expected and choice["text"] == text_of(live, expected) and choice["index"] == 0
    assert choice["finish_reason"] == ("stop" if len(expected) < 6 else "length")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                             "total_tokens": len(ids) + len(expected)}  # fmt: skip
    # token ids are taken as they are: without BOS the model sees another prompt
    no_bos = completed(live, prompt=PROMPTS[0], max_tokens=6, temperature=0, add_special_tokens=False, logprobs=0,
                       return_tokens_as_token_ids=True)  # fmt: skip
    assert token_ids(no_bos["choices"][0]) == reference(live, ids[1:], 6)
    assert no_bos["usage"]["prompt_tokens"] == len(ids) - 1


def test_a_list_of_prompts_gets_n_choices_each_in_prompt_order(live):
    """Choice prompt * n + i is prompt's i-th; a string and its token ids are the same prompt."""
    ids = [tokenized(live, p) for p in PROMPTS]
    one_by_one = [completed(live, prompt=p, max_tokens=5, temperature=0)["choices"][0]["text"] for p in PROMPTS]
    for prompt in (PROMPTS, ids):
        body = completed(live, prompt=prompt, max_tokens=5, temperature=0, n=2)
        assert [c["index"] for c in body["choices"]] == list(range(6))
        assert [c["text"] for c in body["choices"]] == [t for t in one_by_one for _ in range(2)]
        assert body["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    seeded = completed(live, prompt=PROMPTS[:2], max_tokens=8, temperature=1.0, seed=7, n=2)
    alone = completed(live, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, seed=7, n=2)
    assert [c["text"] for c in seeded["choices"][2:]] == [c["text"] for c in alone["choices"]]


def test_echo_with_max_tokens_0_is_the_prompts_loglikelihood(live):
    """lm-eval's loglikelihood request: token ids, echo, logprobs 1, max_tokens 0. The answer is the
    prompt alone, each token's logprob given those before it (BOS has none) and the best there."""
    ids = tokenized(live, PROMPTS[1])
    body = completed(live, prompt=[ids], max_tokens=0, echo=True, logprobs=1, temperature=0)
    (choice,) = body["choices"]
    assert choice["text"] == live.processor.tokenizer.decode(ids, skip_special_tokens=False)
    assert body["usage"]["completion_tokens"] == 0
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    expected = whole_prompt_logprobs(live.model, live.processor.build_token_ids(ids))  # [P - 1, V]
    own = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert logprobs["token_logprobs"][1:] == pytest.approx(own.tolist(), abs=1e-4)
    for position, top in enumerate(logprobs["top_logprobs"][1:]):
        best = expected[position].max().item()
        assert len(top) in (1, 2) and max(top.values()) == pytest.approx(best, abs=1e-4)
        assert logprobs["token_logprobs"][position + 1] in top.values()
    offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_echo_puts_the_prompt_before_the_completion_and_its_logprobs_before_the_completions(live):
    # token ids as keys: a random model's byte tokens often share a text ("\ufffd"), and one key
    fields = dict(prompt=PROMPTS[2], max_tokens=4, temperature=0, logprobs=3, return_tokens_as_token_ids=True)
    plain = completed(live, **fields)["choices"][0]
    echoed = completed(live, **fields, echo=True)["choices"][0]
    prompt_length = len(tokenized(live, PROMPTS[2]))
    assert echoed["text"] == PROMPTS[2] + plain["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert echoed["logprobs"][key][prompt_length:] == plain["logprobs"][key]
    assert len(echoed["logprobs"]["tokens"]) == prompt_length + len(plain["logprobs"]["tokens"])
    for top, own in zip(plain["logprobs"]["top_logprobs"], plain["logprobs"]["token_logprobs"], strict=True):
        assert 3 <= len(top) <= 4 and own in top.values()  # the K best and the sampled token
        assert max(top.values()) >= own


def test_a_stream_joins_up_to_the_whole_answer(live):
    """Text, logprobs (text_offset too) and usage, streamed and not, for two prompts, n=2 and echo."""
    fields = dict(prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=2, echo=True, logprobs=2)
    whole = completed(live, **fields)
    chunks = []
    with httpx.stream("POST", f"{live.url}/v1/completions", timeout=60,
                      json={"model": MODEL_NAME, "stream": True, "stream_options": {"include_usage": True},
                            **fields}) as response:  # fmt: skip
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [choice["finish_reason"]]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for c in mine for x in c["logprobs"][key]] == choice["logprobs"][key], key


def test_the_openai_client(live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    answer = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    raw = completed(live, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert answer.choices[0].text == raw["choices"][0]["text"]
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text


def test_truncate_prompt_tokens_keeps_the_last_tokens(live):
    ids = tokenized(live, "one two three four five six seven")
    kept = completed(live, prompt="one two three four five six seven", max_tokens=4, temperature=0, echo=True,
                     truncate_prompt_tokens=4)  # fmt: skip
    as_ids = completed(live, prompt=ids[-4:], max_tokens=4, temperature=0)
    assert kept["usage"]["prompt_tokens"] == 4
    prefix = live.processor.tokenizer.decode(ids[-4:], skip_special_tokens=False)
    assert kept["choices"][0]["text"] == prefix + as_ids["choices"][0]["text"]
    whole = completed(live, prompt=PROMPTS[0], max_tokens=2, truncate_prompt_tokens=-1)
    assert whole["usage"]["prompt_tokens"] == len(tokenized(live, PROMPTS[0]))


def test_prompt_logprobs_sit_in_each_choice(live):
    ids = tokenized(live, PROMPTS[0])
    body = completed(live, prompt=PROMPTS[0], max_tokens=2, prompt_logprobs=1, n=2, echo=True, logprobs=3)
    for choice in body["choices"]:
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(ids) and entries[0] is None
        for token, entry in zip(ids[1:], entries[1:], strict=True):
            assert str(token) in entry and 1 <= len(entry) <= 2  # the request's K = 1, though echo asked for 3
        echoed_top = choice["logprobs"]["top_logprobs"][1 : len(ids)]
        assert all(3 <= len(top) <= 4 for top in echoed_top)
    assert "prompt_logprobs" not in completed(live, prompt=PROMPTS[0], max_tokens=2)["choices"][0]


def test_structured_output(live):
    pytest.importorskip("xgrammar")
    body = completed(live, prompt=PROMPTS[0], max_tokens=20, structured_outputs={"choice": ["red", "blue"]}, n=2,
                     temperature=1.0, seed=3)  # fmt: skip
    assert {c["text"] for c in body["choices"]} <= {"red", "blue"}


@pytest.mark.parametrize(
    "fields, status, param, code",
    [
        ({"prompt": "x", "suffix": "y"}, 400, "suffix", "unsupported"),
        ({"prompt": []}, 400, "prompt", None),
        ({"prompt": [[1, 2], []]}, 400, "prompt", None),
        ({"prompt": "", "add_special_tokens": False}, 400, "prompt", None),
        ({"prompt": [10**9]}, 400, "prompt", None),
        ({"prompt": [-1]}, 400, "prompt", None),
        ({"prompt": ["a", [1]]}, 400, None, None),
        ({"prompt": 5}, 400, "prompt", None),
        ({}, 400, "prompt", None),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
        ({"prompt": "x", "logprobs": 21}, 400, "logprobs", None),
        ({"prompt": "x", "logprobs": -1}, 400, "logprobs", None),
        ({"prompt": "x", "max_tokens": 10**6}, 400, "prompt", "context_length_exceeded"),
        ({"prompt": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens", None),
        ({"prompt": "x", "truncate_prompt_tokens": 10**6}, 400, "truncate_prompt_tokens", None),
        ({"prompt": "x", "use_beam_search": True}, 400, "use_beam_search", "unsupported"),
        ({"prompt": "x", "n": 0}, 400, "n", None),
        ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs", "unsupported"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
        ({"prompt": "x", "temperature": -1}, 400, "temperature", None),
        ({"prompt": "x", "model": "other"}, 404, "model", "model_not_found"),
    ],
)
def test_bad_requests_are_openai_errors_naming_the_field(live, fields, status, param, code):
    assert_error(complete(live, **fields), status, param, code)
    assert httpx.get(f"{live.url}/health").status_code == 200


def test_tokenize_takes_one_of_messages_and_prompt(live):
    both = httpx.post(f"{live.url}/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "x"}]})
    assert_error(both, 400, "messages")
    assert_error(httpx.post(f"{live.url}/tokenize", json={}), 400, "messages")


def test_each_prompt_takes_a_place_in_the_queue(live):
    with serve(ServeConfig(server=ServerConfig(max_queued_requests=2)), live.engine, live.processor) as small:
        response = httpx.post(f"{small.url}/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPTS})
        assert_error(response, 503, code="service_unavailable")
        assert response.headers["retry-after"]
        response = httpx.post(f"{small.url}/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPTS[:2]})
        assert response.status_code == 200 and len(response.json()["choices"]) == 2


def test_lm_evals_remote_tokenizer_finds_what_it_reads(live):
    """lm-eval's local-completions checks GET /tokenizer_info for eos_token, then tokenizes through
    POST /tokenize {"prompt", "add_special_tokens": false} and decodes through /detokenize. The
    endpoint is vLLM's opt-in one: off by default, behind the API key when one is set."""
    assert httpx.get(f"{live.url}/tokenizer_info").status_code == 404
    config = ServeConfig(server=ServerConfig(enable_tokenizer_info=True, api_key="k"))
    with serve(config, live.engine, live.processor) as on:
        assert httpx.get(f"{on.url}/tokenizer_info").status_code == 401
        key = {"authorization": "Bearer k"}
        info = httpx.get(f"{on.url}/tokenizer_info", headers=key).json()
        cfg = live.processor.cfg
        assert info["model_max_length"] == on.state.max_model_len and info["tokenizer_class"]
        assert not any(k.endswith("_file") or k == "name_or_path" for k in info), info
        for name, ids in (("eos_token", cfg.eos_token_ids), ("bos_token", (cfg.bos_token_id,))):
            tokens = httpx.post(f"{on.url}/tokenize", json={"prompt": info[name], "add_special_tokens": False},
                                headers=key).json()["tokens"]  # fmt: skip
            assert len(tokens) == 1 and tokens[0] in ids, (name, info[name], tokens)  # CogVLM2 stops on two ids
        text = httpx.post(f"{on.url}/detokenize", json={"tokens": tokenized(live, "hello")}, headers=key).json()
        assert text["prompt"].endswith("hello")


def test_a_client_leaving_a_stream_of_several_prompts_aborts_them_all(live):
    engine = live.engine.engine
    aborted = metric(live, "request_success_total", 'finished_reason="abort"')
    body = {"model": MODEL_NAME, "prompt": PROMPTS, "n": 2, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # a token arrived: the requests are running; now hang up
    assert wait_until(lambda: engine.kv.num_free_blocks == len(engine.kv.pool.blocks) and not engine.scheduler.requests)
    time.sleep(0.1)
    assert metric(live, "request_success_total", 'finished_reason="abort"') == aborted + 6  # 3 prompts x n = 2


def test_a_client_leaving_before_the_whole_answer_stops_every_prompt(live):
    engine = live.engine.engine
    body = {"model": MODEL_NAME, "prompt": PROMPTS[:2], "n": 2, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/completions", json=body, timeout=0.5)
    assert wait_until(lambda: engine.kv.num_free_blocks == len(engine.kv.pool.blocks) and not engine.scheduler.requests)


def test_merged_closes_every_stream_when_closed_or_when_one_fails():
    closed = []

    async def stream(name, items, fail=False):
        try:
            for item in items:
                await asyncio.sleep(0)
                yield item
            if fail:
                raise ValueError(f"{name} failed")
            await asyncio.sleep(3600)  # a request that never finishes on its own
        finally:
            closed.append(name)

    @dataclass
    class Output:  # a stand-in RequestOutput: merged re-indexes it with dataclasses.replace
        index: int

    async def first_two():
        outputs = merged([stream("a", [Output(0), Output(1)]), stream("b", [Output(1)])], n=2)
        got = [await anext(outputs), await anext(outputs)]
        await outputs.aclose()
        return got

    got = asyncio.run(first_two())
    assert sorted(o.index for o in got) in ([0, 1], [0, 3])  # a's are choices 0 and 1, b's is 1 * 2 + 1
    assert sorted(closed) == ["a", "b"]
    closed.clear()

    async def failing():
        outputs = merged([stream("a", []), stream("b", [Output(0)], fail=True)], n=1)
        return [o async for o in outputs]

    with pytest.raises(ValueError, match="b failed"):
        asyncio.run(failing())
    assert sorted(closed) == ["a", "b"]
