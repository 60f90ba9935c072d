"""The checkpoint's sampling defaults (generation_config.json) reach what a request leaves unset,
never what it sets, from `cogserve serve`'s start to the engine."""

import json
import logging
import shutil
from dataclasses import replace
from types import SimpleNamespace

import httpx
import pytest

from model.config import ConfigError
from model.generation_config import GenerationDefaults
from model.processor import PromptInputs
from server.chat import ChatHandler
from server.config import ModelConfig, ServeConfig, ServerConfig
from server.engine import EngineConfig
from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.sampling import sampling_params as to_params
from tests.server.live_server import MODEL_NAME, running_engine, serve

SHIPPED = GenerationDefaults(temperature=0.6, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1, max_tokens=7)


def body(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], **fields)


def sampling_params(request: ChatCompletionRequest, max_n: int, defaults: GenerationDefaults):
    return to_params(request, max_n, defaults, logprobs=None, max_tokens=request.max_tokens)


def test_unset_fields_take_the_defaults_and_set_ones_keep_the_request_value():
    params = sampling_params(body(), 4, SHIPPED)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == \
        (0.6, 0.9, 20, 0.05, 1.1)  # fmt: skip
    assert params.max_tokens is None  # the default max_tokens waits for the prompt (check_request)
    mine = sampling_params(body(temperature=0, top_p=1, top_k=0, min_p=0, repetition_penalty=1, max_tokens=3), 4,
                           SHIPPED)  # fmt: skip
    # zeros the request sends are values, not "unset"
    got = (mine.temperature, mine.top_p, mine.top_k, mine.min_p, mine.repetition_penalty, mine.max_tokens)
    assert got == (0, 1, 0, 0, 1, 3)
    plain = sampling_params(body(), 4, GenerationDefaults())
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p, plain.repetition_penalty) == (1, 1, 0, 0, 1)


def test_the_default_max_tokens_is_capped_to_the_context_the_prompt_leaves():
    model = SimpleNamespace(vocab_size=100, eos_token_ids=(2,))
    state = SimpleNamespace(processor=SimpleNamespace(cfg=model), max_model_len=50,
                            generation_defaults=GenerationDefaults(max_tokens=1000))  # fmt: skip
    handler = ChatHandler(state)
    prompt = PromptInputs(input_ids=[1] * 40, token_type_ids=[0] * 40, position_ids=list(range(40)))
    assert handler.check_request(prompt, sampling_params(body(), 4, state.generation_defaults)).max_tokens == 10
    state.generation_defaults = GenerationDefaults(max_tokens=4)
    assert handler.check_request(prompt, sampling_params(body(), 4, state.generation_defaults)).max_tokens == 4
    with pytest.raises(APIError) as err:  # the request's own max_tokens is not capped: it asked for too much
        handler.check_request(prompt, sampling_params(body(max_tokens=1000), 4, state.generation_defaults))
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    with running_engine(tiny_checkpoints[1]) as loaded:
        yield loaded


def test_a_request_without_max_tokens_stops_at_the_checkpoint_default(loaded):
    _, processor, engine = loaded
    with serve(ServeConfig(), engine, processor) as live:
        live.state.generation_defaults = GenerationDefaults(max_tokens=3)
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
        answer = httpx.post(f"{live.url}/v1/chat/completions", json=chat, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 3 and answer["choices"][0]["finish_reason"] == "length"
        answer = httpx.post(f"{live.url}/v1/chat/completions", json={**chat, "max_tokens": 5}, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 5


def checkpoint_with(folder, tmp_path, generation_config):
    copy = tmp_path / "checkpoint"
    shutil.copytree(folder, copy)
    (copy / "generation_config.json").write_text(json.dumps(generation_config))
    return copy


def serve_config(model, setting="auto") -> ServeConfig:
    return ServeConfig(model=ModelConfig(model=str(model), device="cpu"), engine=EngineConfig(num_kv_blocks=512),
                       server=ServerConfig(generation_config=setting))  # fmt: skip


def test_serve_loads_the_defaults_and_says_so(tiny_checkpoints, tmp_path, caplog):
    from server.serve_command import load_engine, make_state

    model = checkpoint_with(tiny_checkpoints[1], tmp_path, {"temperature": 0.6, "top_p": 0.9, "do_sample": True})
    state = make_state(serve_config(model))
    with caplog.at_level(logging.WARNING, logger="server.serve_command"):
        load_engine(state)
    try:
        assert state.generation_defaults == GenerationDefaults(temperature=0.6, top_p=0.9)
        assert "generation_config.json" in caplog.text and "'temperature': 0.6" in caplog.text
    finally:
        state.engine.stop()
    state = make_state(replace(serve_config(model), server=ServerConfig(generation_config="none")))
    load_engine(state)
    try:
        assert state.generation_defaults == GenerationDefaults()
    finally:
        state.engine.stop()


def test_a_broken_generation_config_stops_the_start_before_the_weights_load(tiny_checkpoints, tmp_path):
    from server.serve_command import load_engine, make_state

    state = make_state(serve_config(checkpoint_with(tiny_checkpoints[1], tmp_path, {"top_p": 2.0})))
    with pytest.raises(ConfigError, match="'top_p'"):
        load_engine(state)
    assert state.engine is None
