"""What chat and text completions do alike before the engine has a request: the model name, the
sampling parameters (server/sampling.py), bad words, compiling a structured output, the context
limit and the queue. One subclass per endpoint builds its prompt and its answer."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from model.processor import PromptInputs
from model.sampling_params import ParamError, SamplingParams
from server.errors import bad_request, model_not_found, unavailable
from server.protocol import SamplingRequest
from server.sampling import output_constraint, sampling_params
from server.token_bytes import TokenBytes

# bad_words: each is checked against the output at every step of its request, on the host
MAX_BAD_WORDS = 128


class Handler:
    """Per-server state an endpoint needs; one instance per endpoint per app."""

    def __init__(self, state):
        self.state = state
        self._token_bytes: TokenBytes | None = None  # built once the tokenizer has loaded; caches per token

    @property
    def token_bytes(self) -> TokenBytes:
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self.state.processor.tokenizer)
        return self._token_bytes

    def admit(self, body: SamplingRequest) -> None:
        """First: a server that is loading or draining answers 503 whatever the body holds."""
        self.state.check_accepting()
        if body.model != self.state.served_model_name:
            raise model_not_found(body.model)

    async def params(self, body: SamplingRequest, *, logprobs: int | None, max_tokens: int | None,
                     max_tokens_field: str = "max_tokens") -> SamplingParams:  # fmt: skip
        """The checks every request passes before its prompt is built, and its SamplingParams;
        a structured output is compiled here, off the event loop (up to seconds for a large
        schema), so that the engine's compile is a cache hit."""
        state = self.state
        params = sampling_params(body, state.config.server.max_n, state.generation_defaults, logprobs=logprobs,
                                 max_tokens=max_tokens, max_tokens_field=max_tokens_field)  # fmt: skip
        if body.bad_words:
            params = replace(params, bad_word_ids=self.bad_word_ids(body.bad_words))
        if (constraint := output_constraint(body)) is not None:
            try:
                params = replace(params, constraint=constraint)
                await asyncio.to_thread(state.engine.grammars.compile, constraint)
            except ParamError as err:
                raise bad_request(str(err), err.field) from err
        return params

    def bad_word_ids(self, words: list[str]) -> tuple[tuple[int, ...], ...]:
        """vLLM's bad_words in the model's tokens: each word on its own and after a space."""
        if len(words) > MAX_BAD_WORDS:
            raise bad_request(f"bad_words holds at most {MAX_BAD_WORDS} words, got {len(words)}", "bad_words")
        if blank := [w for w in words if not w.strip()]:
            raise bad_request(f"bad_words must be words, got {blank[0]!r}", "bad_words")
        return tuple(ids for word in words for ids in self.state.processor.word_token_ids(word))

    def check_request(self, prompt: PromptInputs, params: SamplingParams, field: str = "messages") -> SamplingParams:
        """What needs the model: the engine checks the same, but by then a stream has said 200.
        Returns `params` with the checkpoint's default max_tokens where the request set none,
        capped to the context the prompt leaves (vLLM's way with a default). `field` names the
        prompt's field in a context-length error."""
        try:
            cfg = self.state.processor.cfg  # the model's
            params.check_model(cfg.vocab_size, cfg.eos_token_ids)
        except ParamError as err:
            raise bad_request(str(err), err.field) from err
        limit = self.state.max_model_len
        default_max = self.state.generation_defaults.max_tokens
        if params.max_tokens is None and default_max is not None and prompt.num_tokens < limit:
            params = replace(params, max_tokens=max(params.min_tokens, 1, min(default_max, limit - prompt.num_tokens)))
        if prompt.num_tokens >= limit or (params.max_tokens and prompt.num_tokens + params.max_tokens > limit):
            where = "messages, image slots included" if field == "messages" else field
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt.num_tokens + (params.max_tokens or 0)} tokens ({prompt.num_tokens} in the {where}, "
                f"{params.max_tokens or 0} in the completion). Please reduce the length of the {field} or the "
                "completion.",
                field,
                "context_length_exceeded",
            )
        return params

    def check_queue(self, num_requests: int = 1) -> None:
        limit = self.state.config.server.max_queued_requests
        if self.state.engine.num_waiting + num_requests > limit:
            raise unavailable(f"the queue is full ({limit} waiting); retry")
