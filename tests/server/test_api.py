"""The HTTP API through the official `openai` client and raw HTTP, against a real server on
loopback over the tiny model."""

import base64
import json
import re
import sys
import time

import httpx
import openai
import pytest

from model.generation import GenerationParams, generate_reference
from model.processor import Conversation, open_image
from server.config import ServeConfig, ServerConfig
from tests.server.live_server import MODEL_NAME, ImageHost, png_bytes, running_engine, serve, wait_until, with_media


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    # NOTE: look-ahead steps, as CUDA serves by default: every API behaviour below (streams,
    # n, logprobs, stops, disconnects) goes through the engine's look-ahead path
    with running_engine(tiny_checkpoints[1], async_scheduling=True) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost()
    yield host
    host.close()


@pytest.fixture(scope="module")
def open_server(loaded):
    """Private addresses allowed (the image host is on loopback), 1 s image timeout, 1 MiB bodies."""
    _, processor, engine = loaded
    config = with_media(
        ServeConfig(server=ServerConfig(max_request_bytes=2**20)), allow_private_networks=True, fetch_timeout_s=1.0
    )
    with serve(config, engine, processor) as live:
        yield live


@pytest.fixture(scope="module")
def strict_server(loaded):
    _, processor, engine = loaded
    with serve(ServeConfig(), engine, processor) as live:
        yield live


@pytest.fixture
def client(open_server):
    return openai.OpenAI(base_url=f"{open_server.url}/v1", api_key="unused", max_retries=0)


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text="What is in the image?"):
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}],
    }


def reference_text(model, processor, conversation, max_tokens):
    inputs = processor.build(conversation)
    tokens = generate_reference(model, inputs, GenerationParams(max_tokens=max_tokens)).output_token_ids
    if tokens and tokens[-1] in model.config.eos_token_ids:
        tokens = tokens[:-1]
    return processor.decode(tokens), inputs.num_tokens


def test_non_streaming_text_chat(client):
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
    )
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_history_system_and_image_match_the_reference(client, loaded):
    """Greedy through the server equals the reference path for the same conversation."""
    model, processor, _ = loaded
    png = png_bytes((10, 120, 220))
    messages = [
        {"role": "system", "content": "Answer briefly."},
        image_message(data_uri(png), "What colour?"),
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And the shape?"},
    ]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0)
    conversation = Conversation(
        query="And the shape?", history=(("What colour?", "Blue."),), image=open_image(png), system="Answer briefly."
    )
    text, num_prompt = reference_text(model, processor, conversation, 6)
    assert response.choices[0].message.content == text
    assert response.usage.prompt_tokens == num_prompt  # image slots counted


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg")])
def test_data_uri_formats(client, fmt, mime):
    uri = data_uri(png_bytes(fmt=fmt), mime)
    response = client.chat.completions.create(model=MODEL_NAME, messages=[image_message(uri)], max_tokens=2)
    assert response.usage.prompt_tokens > 66


def test_http_image_url_from_a_local_server(client, image_host, loaded):
    model, processor, _ = loaded
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=[image_message(f"{image_host.url}/red.png")], max_tokens=4, temperature=0
    )
    conversation = Conversation(query="What is in the image?", image=open_image(png_bytes()))
    assert response.choices[0].message.content == reference_text(model, processor, conversation, 4)[0]


def test_streaming_with_usage_and_done(client, open_server):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert any(c.choices and c.choices[0].finish_reason in ("stop", "length") for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
    )
    assert streamed == whole.choices[0].message.content
    raw = httpx.post(
        f"{open_server.url}/v1/chat/completions",
        json={"model": MODEL_NAME, "stream": True, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert raw.text.endswith("data: [DONE]\n\n") and raw.headers["content-type"].startswith("text/event-stream")


def test_continuous_usage_stats_count_every_chunk(open_server):
    def stream(options):
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                "ignore_eos": True, "stream": True, "stream_options": options}  # fmt: skip
        raw = httpx.post(f"{open_server.url}/v1/chat/completions", json=body, timeout=60).text
        return [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: {")]

    chunks = stream({"include_usage": True, "continuous_usage_stats": True})
    usages = [c["usage"] for c in chunks]
    assert usages[0]["completion_tokens"] == 0 and usages[-1]["completion_tokens"] == 6
    counts = [u["completion_tokens"] for u in usages]
    assert counts == sorted(counts) and len(set(counts)) > 2  # grows as tokens stream
    assert all(u["prompt_tokens"] == usages[0]["prompt_tokens"] > 0 for u in usages)
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    plain = stream({"include_usage": True})  # the OpenAI default: null until the last chunk
    assert all(c["usage"] is None for c in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] == 6
    assert all("usage" not in c for c in stream({"continuous_usage_stats": True}))  # needs include_usage, as in vLLM


def test_logprobs_n_and_stop(client):
    response = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        n=2,
        seed=1,
    )
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        for entry in choice.logprobs.content:
            assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
    greedy = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    text = greedy.choices[0].message.content
    # the tokens' bytes are the text (sentencepiece's first space aside: a full decode drops it); the
    # random model emits stray bytes of byte fallback, U+FFFD in the text as in this decode
    joined = b"".join(bytes(entry.bytes) for entry in greedy.choices[0].logprobs.content).decode(errors="replace")
    assert joined.removeprefix(" ") == text
    assert len(text) > 3 and text[1:3].strip(), f"greedy text {text!r} gives no usable stop string"
    stopped = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        stop=[text[1:3]],
    )
    assert stopped.choices[0].message.content == text[: text.find(text[1:3])]
    assert stopped.choices[0].finish_reason == "stop"
    # before min_tokens no stop string ends the completion (vLLM's rule); it once ended at the first match
    held = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0, stop=[text[1:3]],
                                          extra_body={"min_tokens": 8, "ignore_eos": True})  # fmt: skip
    assert held.usage.completion_tokens == 8 and held.choices[0].message.content.startswith(text[:3])
    kept = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0, stop=[text[1:3]],
                                          extra_body={"include_stop_str_in_output": True})  # fmt: skip
    assert kept.choices[0].message.content == text[: text.find(text[1:3]) + 2]


def test_tokens_as_token_ids(open_server):
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "logprobs": True,
        "return_tokens_as_token_ids": True,
    }
    content = httpx.post(f"{open_server.url}/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]
    assert all(entry["token"].startswith("token_id:") for entry in content["content"])


def post(server, body, **kw):
    if body:  # json.dumps writes NaN and Infinity, as Python clients send them; httpx's json= refuses them
        headers = {"content-type": "application/json", **kw.get("headers", {})}
        kw = {**kw, "content": json.dumps(body), "headers": headers}
    return httpx.post(f"{server.url}/v1/chat/completions", **{"timeout": 30, **kw})


def metric(server, name, labels=""):
    """The sum over the series of a /metrics counter or gauge whose labels include `labels`."""
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(f"cogserve:{name}{{") and labels in line)  # fmt: skip


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def chat(**extra):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        (chat(temperature="hot"), 400, "temperature", None),
        (chat(model="gpt-4"), 404, "model", "model_not_found"),
        (chat(top_logprobs=21, logprobs=True), 400, "top_logprobs", None),
        (chat(max_tokens=-1), 400, "max_tokens", None),
        (chat(n=1000), 400, "n", None),
        (chat(tools=[{"type": "function"}]), 400, "tools", "unsupported"),
        (chat(response_format={"type": "json_schema"}), 400, "response_format", None),  # no schema
        (chat(response_format={"type": "json_schema", "json_schema": {"schema": "x"}}), 400, "response_format", None),
        (chat(response_format={"type": "yaml"}), 400, "response_format", None),
        (chat(response_format={"type": "json_object"}, ignore_eos=True), 400, "ignore_eos", None),
        (chat(guided_json={"type": "strange"}), 400, "guided_json", None),
        (chat(guided_json=5), 400, "guided_json", None),
        (chat(guided_regex="(("), 400, "guided_regex", None),
        (chat(guided_choice=[]), 400, "guided_choice", None),
        (chat(guided_choice="red"), 400, "guided_choice", None),
        (chat(guided_grammar="root ::= "), 400, "guided_grammar", None),
        (chat(guided_regex="a", guided_choice=["a"]), 400, "guided_choice", None),  # two at once
        (chat(response_format={"type": "json_object"}, guided_regex="a"), 400, "guided_regex", None),
        (chat(structured_outputs={"regex": "a", "choice": ["a"]}), 400, "structured_outputs", None),
        (chat(structured_outputs={}), 400, "structured_outputs", None),
        (chat(structured_outputs="a+"), 400, "structured_outputs", None),
        (chat(prompt_logprobs=0, stream=True), 400, "prompt_logprobs", "unsupported"),
        (chat(prompt_logprobs=21), 400, "prompt_logprobs", None),
        (chat(echo=True), 400, "echo", "unsupported"),
        (chat(best_of=3), 400, "best_of", "unsupported"),
        (chat(chat_template="{{ messages }}"), 400, "chat_template", "unsupported"),
        (chat(chat_template_kwargs={"enable_thinking": True}), 400, "chat_template_kwargs", "unsupported"),
        (chat(add_generation_prompt=False), 400, "add_generation_prompt", "unsupported"),
        (chat(continue_final_message=True), 400, "continue_final_message", "unsupported"),
        (chat(truncate_prompt_tokens=3), 400, "truncate_prompt_tokens", "unsupported"),  # would cut
        (chat(truncate_prompt_tokens=0), 400, "truncate_prompt_tokens", None),
        (chat(messages=[{"role": "assistant", "content": "x"}]), 400, "messages", None),
        (chat(messages=[]), 400, "messages", None),
        (chat(max_tokens=5000), 400, "messages", "context_length_exceeded"),
        (chat(messages=[image_message(data_uri(b"not an image at all"))]), 400, None, "invalid_image"),
        (
            chat(messages=[image_message(data_uri(png_bytes())), image_message(data_uri(png_bytes()))]),
            400,
            "messages",
            None,
        ),
        # each of these once stopped the engine for every request (a 500, then 503s)
        (chat(seed=2**70, temperature=1.0), 400, "seed", None),
        (chat(top_k=-2, temperature=1.0), 400, "top_k", None),
        (chat(temperature=float("nan")), 400, "temperature", None),
        (chat(repetition_penalty=float("inf")), 400, "repetition_penalty", None),
        (chat(logit_bias={"abc": 1}), 400, "logit_bias", None),
        (chat(logit_bias={"5": 101}), 400, "logit_bias", None),
        (chat(logit_bias={"100000": 1}), 400, "logit_bias", None),
        (chat(allowed_token_ids=[]), 400, "allowed_token_ids", None),
        (chat(allowed_token_ids=[5, 100000]), 400, "allowed_token_ids", None),  # past the vocabulary
        (chat(allowed_token_ids=["five"]), 400, "allowed_token_ids.0", None),
        (chat(allowed_token_ids=[7], stop_token_ids=[7], min_tokens=1), 400, "allowed_token_ids", None),  # none left
        (chat(bad_words=["  "]), 400, "bad_words", None),
        (chat(bad_words=[f"w{i}" for i in range(129)]), 400, "bad_words", None),
        (chat(bad_words="red"), 400, "bad_words", None),
        (chat(stream_options={"include_usage": True}), 400, "stream_options", None),
        (
            chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
            400,
            "messages.0.content.0",
            None,
        ),  # fmt: skip
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(open_server, body, status, param, code):
    assert_error(post(open_server, body), status, param, code)
    assert httpx.get(f"{open_server.url}/health").status_code == 200


def test_skip_special_tokens_false_shows_them(open_server):
    """vLLM's skip_special_tokens: the model writing <s> (logit_bias forces it) shows as text only
    when the request asks; the stop token that ends a request is never text."""
    bos = open_server.state.processor.tokenizer.bos_token_id

    def text(**extra):
        body = chat(max_tokens=2, temperature=0, logit_bias={str(bos): 100}, **extra)
        response = post(open_server, body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    assert text() == ""
    assert text(skip_special_tokens=False) == "<s><s>"


def test_the_values_that_change_nothing_are_served(open_server):
    """best_of up to n, the default generation-prompt flags, empty template kwargs and a
    truncate_prompt_tokens that cuts nothing ask for nothing cogserve does not do: only other
    values are refused."""
    body = chat(n=2, best_of=2, temperature=1.0, add_generation_prompt=True, continue_final_message=False,
                chat_template_kwargs={})  # fmt: skip
    response = post(open_server, body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2
    for truncate in (-1, 1000):  # the context; more than the prompt holds
        assert post(open_server, chat(truncate_prompt_tokens=truncate)).status_code == 200


def test_integers_past_int64_are_served(open_server):
    """A top_k of 1e30 once stopped the engine (an int64 conversion in the sampler)."""
    response = post(open_server, chat(top_k=10**30, temperature=1.0, min_tokens=1, stop_token_ids=[10**30]))
    assert response.status_code == 200, response.text
    assert httpx.get(f"{open_server.url}/health").status_code == 200


def test_an_unknown_content_part_is_named_in_the_error(open_server):
    body = chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])
    message = post(open_server, body).json()["error"]["message"]
    assert "input_audio" in message and "image_url" in message and "valid string" not in message


def test_logit_bias_steers_the_answer(client):
    def first_token(**extra):
        response = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=1, temperature=0, logprobs=True, top_logprobs=5,
                                                  extra_body={"return_tokens_as_token_ids": True}, **extra)  # fmt: skip
        content = response.choices[0].logprobs.content[0]
        return int(content.token.removeprefix("token_id:")), content.top_logprobs

    best, top = first_token()
    fifth = int(top[-1].token.removeprefix("token_id:"))
    assert first_token(logit_bias={str(fifth): 100})[0] == fifth != best
    assert first_token(logit_bias={str(best): -100})[0] == int(top[1].token.removeprefix("token_id:"))


def test_allowed_token_ids_keep_the_answer_among_them(client, open_server):
    """vLLM's allowed_token_ids: greedy picks the best of them (the raw model's fourth best here),
    and sampled completions, streamed or not, never leave them (nor stop: no eos among them)."""

    def ask(**extra):
        body = {"return_tokens_as_token_ids": True, **extra.pop("extra_body", {})}
        return client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                              logprobs=True, extra_body=body, **extra)  # fmt: skip

    def ids(logprobs) -> list[int]:
        return [int(c.token.removeprefix("token_id:")) for c in logprobs]

    top = ask(max_tokens=1, temperature=0, top_logprobs=8).choices[0].logprobs.content[0].top_logprobs
    ranked = [t for t in ids(top) if t not in open_server.state.processor.cfg.eos_token_ids]
    greedy = ask(max_tokens=1, temperature=0, extra_body={"allowed_token_ids": ranked[3:6]})
    assert ids(greedy.choices[0].logprobs.content) == [ranked[3]]
    allowed = ranked[2:5]
    sampled = ask(max_tokens=6, temperature=1.5, n=3, seed=1, extra_body={"allowed_token_ids": allowed})
    tokens = [t for choice in sampled.choices for t in ids(choice.logprobs.content)]
    assert set(tokens) <= set(allowed) and len(tokens) == 18  # never eos
    stream = ask(max_tokens=6, temperature=1.5, stream=True, extra_body={"allowed_token_ids": allowed})
    streamed = [
        t for chunk in stream for choice in chunk.choices if choice.logprobs for t in ids(choice.logprobs.content)
    ]
    assert set(streamed) <= set(allowed) and len(streamed) == 6


def test_bad_words_keep_a_word_out_of_the_answer(client, loaded):
    """vLLM's bad_words, in the model's tokens: "red" (one token, "▁red", in this tokenizer) forced
    by logit_bias opens every answer; banned too, it is in none, wherever the bias pushes it."""
    (red,) = loaded[1].word_token_ids("red")
    assert len(red) == 1

    def answer(**extra):
        response = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=6, temperature=0, logprobs=True,
                                                  logit_bias={str(red[0]): 30},
                                                  extra_body={"return_tokens_as_token_ids": True, **extra})  # fmt: skip
        return [int(c.token.removeprefix("token_id:")) for c in response.choices[0].logprobs.content]

    assert answer()[0] == red[0]
    assert red[0] not in answer(bad_words=["red"]) and red[0] not in answer(bad_words=[" red", "blue"])


def test_structured_outputs_in_every_request_form(client, open_server):
    """response_format (json_schema through the openai client's own parameter, json_object),
    vLLM's structured_outputs and guided_* fields: each answer matches its constraint, streamed
    or not. The tiny model has not seen JSON: logit_bias pushes json_object's to close at once."""
    schema = {"type": "object", "properties": {"shape": {"enum": ["circle", "square"]}}, "required": ["shape"],
              "additionalProperties": False}  # fmt: skip

    def ask(**extra):
        response = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Which shape?"}], max_tokens=40, **extra
        )
        assert all(c.finish_reason == "stop" for c in response.choices)
        return [c.message.content for c in response.choices]

    response_format = {"type": "json_schema", "json_schema": {"name": "shape", "schema": schema, "strict": True}}
    for text in ask(response_format=response_format, n=2, temperature=1.0, seed=3):
        assert json.loads(text)["shape"] in ("circle", "square") and set(json.loads(text)) == {"shape"}
    tokenizer = open_server.state.processor.tokenizer
    close = {str(t): 50 for t in range(len(tokenizer)) if tokenizer.decode([t]) == "}"}
    assert ask(response_format={"type": "json_object"}, logit_bias=close, temperature=0) == ["{}"]
    (text,) = ask(extra_body={"structured_outputs": {"regex": "[0-9]{3}"}}, temperature=1.0)
    assert re.fullmatch("[0-9]{3}", text)
    assert ask(extra_body={"guided_choice": ["circle", "square"]}, temperature=0)[0] in ("circle", "square")
    assert ask(extra_body={"guided_grammar": 'root ::= "a" | "b"'})[0] in ("a", "b")
    stream = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Which?"}],
                                            max_tokens=40, stream=True, extra_body={"guided_json": schema})  # fmt: skip
    assert json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices))["shape"] in (
        "circle", "square")  # fmt: skip


def test_prompt_logprobs_beside_the_choices(open_server, loaded):
    """vLLM's shape: per prompt token (the /tokenize endpoint's), {id: {logprob, rank,
    decoded_token}} for the K best and the token itself; None first and on image slots."""
    body = chat(messages=[image_message(data_uri(png_bytes()), "What colour?")], prompt_logprobs=2, n=2)
    response = post(open_server, body)
    assert response.status_code == 200, response.text
    entries = response.json()["prompt_logprobs"]
    tokens = httpx.post(f"{open_server.url}/tokenize", json={"messages": body["messages"]}).json()["tokens"]
    slots = set(loaded[1].build(Conversation(query="x", image=open_image(png_bytes()))).image_slots)
    assert len(entries) == len(tokens) == response.json()["usage"]["prompt_tokens"] and entries[0] is None
    for position, (token, entry) in enumerate(zip(tokens, entries, strict=True)):
        if position == 0 or position in slots:
            assert entry is None
            continue
        assert str(token) in entry and 2 <= len(entry) <= 3
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:2] == [1, 2] and all(e["logprob"] <= 0 and e["decoded_token"] for e in entry.values())
        assert entry[str(token)]["rank"] >= 1
    assert "prompt_logprobs" not in post(open_server, chat()).json()


def test_structured_outputs_without_xgrammar_are_a_400(open_server, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar: ImportError
    response = post(open_server, chat(guided_regex="a+"))
    assert_error(response, 400, "guided_regex")
    assert "pip install 'cogserve[structured]'" in response.json()["error"]["message"]


def test_retrieve_model_and_unknown_routes_in_openai_shape(open_server, client):
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert_error(httpx.post(f"{open_server.url}/v1/embeddings", json={}), 404, code="not_found")
    assert_error(httpx.get(f"{open_server.url}/v1/chat/completions"), 405, code="method_not_allowed")
    assert httpx.head(f"{open_server.url}/health").status_code == 200  # load balancers' probe


def test_logprob_bytes_are_the_tokens_raw_bytes(client, loaded):
    """Forced by logit_bias: half of "ü" (byte fallback <0xC3>) and "▁a" (a word with its space).
    One-token decode gave U+FFFD's bytes [239, 191, 189] and "a"."""
    tokenizer = loaded[1].tokenizer
    for piece, want in (("<0xC3>", [0xC3]), ("▁a", list(b" a"))):
        token_id = tokenizer.convert_tokens_to_ids(piece)
        response = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=1, temperature=0, logprobs=True,
                                                  logit_bias={str(token_id): 100})  # fmt: skip
        assert response.choices[0].logprobs.content[0].bytes == want


def test_developer_messages_are_system_messages(open_server):
    def tokens(role):
        messages = [{"role": role, "content": "Answer briefly."}, {"role": "user", "content": "Hi"}]
        response = httpx.post(f"{open_server.url}/tokenize", json={"model": MODEL_NAME, "messages": messages})
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    assert tokens("developer") == tokens("system") != tokens("user")


def test_detokenize_reverses_tokenize_and_refuses_ids_outside_the_vocabulary(open_server):
    messages = [{"role": "user", "content": "Where is the red circle?"}]
    tokens = httpx.post(f"{open_server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    response = httpx.post(f"{open_server.url}/detokenize", json={"model": MODEL_NAME, "tokens": tokens})
    assert response.status_code == 200, response.text
    text = response.json()["prompt"]
    assert text.startswith("<s>") and "Where is the red circle?" in text  # special tokens as written
    vocab = open_server.state.processor.cfg.vocab_size
    for bad in ([vocab], [5, -1]):  # past the vocabulary; negative (the tokenizer raised: a 500)
        assert_error(httpx.post(f"{open_server.url}/detokenize", json={"tokens": bad}), 400, param="tokens")
    assert_error(httpx.post(f"{open_server.url}/detokenize", json={"tokens": "12"}), 400)
    assert_error(httpx.post(f"{open_server.url}/detokenize", json={"model": "gpt-4", "tokens": [1]}), 404)


def test_context_overflow_message_states_the_numbers(open_server):
    message = post(open_server, chat(max_tokens=5000)).json()["error"]["message"]
    assert "2048" in message and "5000" in message


def test_malformed_json_and_oversized_body(open_server):
    malformed = post(open_server, None, content=b"{not json", headers={"content-type": "application/json"})
    assert_error(malformed, 400, code="invalid_json")
    for content, content_type in ((json.dumps(chat()), "text/plain"), (b"null", "application/json"), (b"", None)):
        headers = {"content-type": content_type} if content_type else {}
        response = post(open_server, None, content=content, headers=headers)
        assert_error(response, 400, code="invalid_json")  # was "body: Input should be a valid dictionary ..."
        assert "Content-Type: application/json" in response.json()["error"]["message"]
    huge = chat(messages=[image_message(data_uri(b"x" * (2**20)))])
    assert_error(post(open_server, huge), 413, code="request_too_large")
    assert httpx.get(f"{open_server.url}/health").status_code == 200


def test_slow_image_server_times_out(open_server, image_host):
    response = post(open_server, chat(messages=[image_message(f"{image_host.url}/slow.png")]))
    assert_error(response, 400, code="image_fetch_timeout")


def test_private_address_refused_by_default(strict_server, image_host):
    response = post(strict_server, chat(messages=[image_message(f"{image_host.url}/red.png")]))
    assert_error(response, 400, code="image_url_forbidden")
    metadata = post(strict_server, chat(messages=[image_message("http://169.254.169.254/latest/meta-data")]))
    assert_error(metadata, 400, code="image_url_forbidden")


def test_models_version_tokenize_metrics_and_request_id(open_server):
    models = httpx.get(f"{open_server.url}/v1/models").json()
    assert models["data"][0]["id"] == MODEL_NAME and models["data"][0]["max_model_len"] == 2048
    assert httpx.get(f"{open_server.url}/version").json()["version"]
    counted = httpx.post(f"{open_server.url}/tokenize", json={"messages": [image_message("https://x.example/a.png")]})
    assert counted.json()["count"] == 1 + 66 + len(counted.json()["tokens"]) - 67
    response = httpx.get(f"{open_server.url}/health", headers={"X-Request-Id": "abc123"})
    assert response.headers["x-request-id"] == "abc123"
    metrics = httpx.get(f"{open_server.url}/metrics").text
    for name in (
        "cogserve:num_requests_running",
        "cogserve:prompt_tokens_total",
        "cogserve:time_to_first_token_seconds",
        "cogserve:kv_cache_usage_perc",
        "cogserve:request_success_total",
    ):
        assert name in metrics
    assert httpx.get(f"{open_server.url}/docs").status_code == 200


def test_api_key_queue_limit_and_draining(loaded):
    _, processor, engine = loaded
    config = ServeConfig(server=ServerConfig(api_key="sekrit", max_queued_requests=0))
    with serve(config, engine, processor) as live:
        assert_error(post(live, chat()), 401, code="invalid_api_key")
        assert_error(httpx.post(f"{live.url}/detokenize", json={"tokens": [1]}), 401, code="invalid_api_key")
        full = post(live, chat(), headers={"Authorization": "Bearer sekrit"})
        assert_error(full, 503)
        assert full.headers["retry-after"]
        assert httpx.get(f"{live.url}/health").status_code == 200  # health needs no key
        live.state.draining = True
        assert httpx.get(f"{live.url}/health").status_code == 503
        assert_error(post(live, chat(), headers={"Authorization": "Bearer sekrit"}), 503)


def test_disconnect_mid_stream_frees_every_block(open_server, loaded):
    _, _, engine = loaded
    kv = engine.engine.kv
    aborted = metric(open_server, "request_success_total", 'finished_reason="abort"')
    body = chat(max_tokens=1500, ignore_eos=True, stream=True)
    with httpx.stream("POST", f"{open_server.url}/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if '"content"' in line and '"role"' not in line:
                break  # a token arrived: the request is running; now hang up
    assert wait_until(lambda: kv.num_free_blocks == len(kv.pool.blocks) and not engine.engine.scheduler.requests)
    assert metric(open_server, "request_success_total", 'finished_reason="abort"') == aborted + 1


def test_a_client_that_leaves_a_non_streaming_request_stops_it(tiny_checkpoints):
    """Its sequences once ran to max_tokens for no one (n=4 x 1500 tokens here); and without
    look-ahead steps (CPU's default) the running gauge kept them once the engine went idle."""
    with (
        running_engine(tiny_checkpoints[1], async_scheduling=False) as (_, processor, engine),
        serve(ServeConfig(), engine, processor) as live,
    ):
        kv = engine.engine.kv

        with pytest.raises(httpx.ReadTimeout):
            post(live, chat(max_tokens=1500, ignore_eos=True, n=4, temperature=1.0), timeout=1.0)
        assert wait_until(lambda: kv.num_free_blocks == len(kv.pool.blocks) and not engine.engine.scheduler.requests)
        time.sleep(0.1)
        assert metric(live, "num_requests_running") == 0
        assert metric(live, "http_responses_total", 'status="499"') == 1
        assert metric(live, "request_success_total", 'finished_reason="abort"') == 4  # the n = 4 completions


def test_a_connection_that_cannot_be_watched_still_gets_its_answer(open_server, monkeypatch):
    """If the ASGI server's receive() raises, the disconnect watch ends at once: that must not read as
    the client leaving (a 499 for every request)."""
    import server.answer

    async def unwatchable(request):
        raise RuntimeError("stand-in: receive() unavailable")

    monkeypatch.setattr(server.answer, "_client_gone", unwatchable)
    response = post(open_server, chat())
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_request_the_engine_fails_to_add_fails_alone(open_server, loaded, monkeypatch):
    """An unexpected error adding one request (here a stand-in RuntimeError for max_tokens=3) is that
    request's 500; it once went up the engine thread and stopped the engine for everyone."""
    engine = loaded[2].engine
    add = engine.add_request

    def failing_add(request_id, prompt, params):
        if params.max_tokens == 3:
            raise RuntimeError("stand-in failure")
        return add(request_id, prompt, params)

    monkeypatch.setattr(engine, "add_request", failing_add)
    assert_error(post(open_server, chat(max_tokens=3)), 500, code="internal_error")
    with httpx.stream("POST", f"{open_server.url}/v1/chat/completions", json=chat(max_tokens=3, stream=True)) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == "internal_error" and events[-1] == "[DONE]"
    assert post(open_server, chat(max_tokens=2)).status_code == 200
    assert httpx.get(f"{open_server.url}/health").status_code == 200


def test_request_timeout_and_cors(loaded):
    _, processor, engine = loaded
    config = ServeConfig(server=ServerConfig(request_timeout_s=0.3, allowed_origins=("https://app.example",)))
    with serve(config, engine, processor) as live:
        slow = post(live, chat(max_tokens=1900, ignore_eos=True))
        assert_error(slow, 408, code="timeout")
        preflight = httpx.options(
            f"{live.url}/v1/chat/completions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(
            f"{live.url}/v1/chat/completions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers
    kv = engine.engine.kv
    assert wait_until(lambda: kv.num_free_blocks == len(kv.pool.blocks))  # the timed-out request was aborted


def test_requests_go_through_look_ahead_steps(loaded, client):
    engine = loaded[2].engine
    before = engine.num_lookahead_steps
    client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    assert engine.num_lookahead_steps > before
