"""POST /v1/chat/completions: request -> conversation -> prompt -> engine stream -> OpenAI shapes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from model.generation_config import GenerationDefaults
from model.processor import PromptError, PromptInputs
from model.sampling_params import CONSTRAINT_KINDS, MAX_LOGPROBS, OutputConstraint, ParamError, SamplingParams
from server import openai_format as fmt
from server.async_engine import EngineDeadError
from server.conversation import parse_messages
from server.errors import APIError, bad_request, model_not_found, unavailable
from server.protocol import ChatCompletionRequest
from server.token_bytes import TokenBytes

logger = logging.getLogger(__name__)
# vLLM request fields this server does not implement; a request that sets one gets a 400 rather
# than an answer that silently ignores it (echo, beam search)
UNSUPPORTED = ("echo", "use_beam_search")
# structured output's request forms: vLLM's structured_outputs keys and its older guided_* fields
CONSTRAINT_KEYS = ("json", "regex", "choice", "grammar", "json_object")
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# bad_words: each is checked against the output at every step of its request, on the host
MAX_BAD_WORDS = 128


def sampling_params(body: ChatCompletionRequest, max_n: int, defaults: GenerationDefaults) -> SamplingParams:
    """The request's sampling; a field it leaves unset takes the checkpoint's default (`defaults`,
    model/generation_config.py) and then OpenAI's. A default max_tokens is applied by
    ChatHandler.check_request, which can cap it to the context left."""
    if not 1 <= body.n <= max_n:
        raise bad_request(f"n must be between 1 and {max_n}, got {body.n}", "n")
    if body.top_logprobs is not None:
        if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {body.top_logprobs}",
                              "top_logprobs")  # fmt: skip
        if not body.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    if body.prompt_logprobs is not None and body.stream:  # vLLM's stream chunks have no place for them
        raise bad_request("prompt_logprobs is not supported with stream", "prompt_logprobs", "unsupported")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options can only be set when stream is true", "stream_options")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    logit_bias = []
    for key, bias in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()):  # also refuses "-1", "1.5" and "²"
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        logit_bias.append((int(key), bias))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    try:
        return SamplingParams(
            n=body.n,
            temperature=first_set(body.temperature, defaults.temperature, 1.0),
            top_p=first_set(body.top_p, defaults.top_p, 1.0),
            top_k=first_set(body.top_k, defaults.top_k, 0),
            min_p=first_set(body.min_p, defaults.min_p, 0.0),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=first_set(body.repetition_penalty, defaults.repetition_penalty, 1.0),
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=stop,
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            prompt_logprobs=body.prompt_logprobs,
            logit_bias=tuple(logit_bias),
            allowed_token_ids=None if body.allowed_token_ids is None else tuple(body.allowed_token_ids),
        )
    except ParamError as err:
        name = err.field
        raise bad_request(str(err), "max_completion_tokens" if body.max_completion_tokens and name == "max_tokens"
                          else name) from err  # fmt: skip


def output_constraint(body: ChatCompletionRequest) -> OutputConstraint | None:
    """Structured output, from whichever one of its request forms is set: OpenAI's response_format
    (json_object, json_schema), vLLM's structured_outputs, or vLLM's older guided_* fields."""
    found: list[OutputConstraint] = []
    if body.response_format is not None:
        kind = body.response_format.get("type", "text")
        if kind == "json_object":
            found.append(OutputConstraint("json_object", "", "response_format"))
        elif kind == "json_schema":
            spec = body.response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict | bool):
                raise bad_request("response_format of type json_schema needs json_schema.schema, a JSON schema "
                                  "object", "response_format")  # fmt: skip
            found.append(_constraint("json", schema, "response_format"))
        elif kind != "text":
            raise bad_request(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                              "response_format")  # fmt: skip
    for name, kind in GUIDED_FIELDS.items():
        if (value := getattr(body, name)) is not None:
            found.append(_constraint(kind, value, name))
    if body.structured_outputs is not None:
        spec = body.structured_outputs
        keys = [k for k in CONSTRAINT_KEYS if isinstance(spec, dict) and spec.get(k) not in (None, False)]
        if not isinstance(spec, dict) or len(keys) != 1:
            raise bad_request(f"structured_outputs must set exactly one of {', '.join(CONSTRAINT_KEYS)}",
                              "structured_outputs")  # fmt: skip
        found.append(_constraint(keys[0], spec[keys[0]], "structured_outputs"))
    if len(found) > 1:
        raise bad_request(f"only one structured output may be asked for; got {found[0].field} and {found[1].field}",
                          found[1].field)  # fmt: skip
    return found[0] if found else None


def _constraint(kind: str, value, name: str) -> OutputConstraint:
    if kind == "json" and isinstance(value, dict | bool):
        value = json.dumps(value)
    elif kind == "json_object":
        value = ""
    elif kind == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise bad_request(f"{name} must be a list of strings", name)
        value = tuple(value)
    elif not isinstance(value, str):
        raise bad_request(f"{name} must be {CONSTRAINT_KINDS[kind]}", name)
    return OutputConstraint(kind, value, name)  # validated with the SamplingParams it joins


def check_truncation(body: ChatCompletionRequest, prompt: PromptInputs) -> None:
    """vLLM's truncate_prompt_tokens keeps a prompt's last N tokens. CogVLM's image slots sit right
    after BOS, so a cut prompt would lose its image or its BOS: served where it cuts nothing (and
    -1, the context), refused where it would cut rather than silently served whole."""
    n = body.truncate_prompt_tokens
    if n is None or n == -1:
        return
    if n < 1:
        raise bad_request(f"truncate_prompt_tokens must be -1 or >= 1, got {n}", "truncate_prompt_tokens")
    if prompt.num_tokens > n:
        raise bad_request(f"truncate_prompt_tokens ({n}) would cut this {prompt.num_tokens}-token prompt: "
                          "cogserve does not truncate prompts", "truncate_prompt_tokens", "unsupported")  # fmt: skip


def first_set(*values):
    return next(v for v in values if v is not None)


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    if body.tools or body.functions or body.tool_choice not in (None, "none"):
        raise bad_request("tool and function calling are not supported by CogVLM", "tools", "unsupported")
    for name in UNSUPPORTED:
        value = getattr(body, name)
        if value is not None and value is not False:  # prompt_logprobs=0 asks for them too (and 0 == False)
            raise bad_request(f"{name} is not supported by cogserve", name, "unsupported")
    if body.best_of is not None and body.best_of > body.n:
        raise bad_request(f"best_of ({body.best_of}) above n ({body.n}) is not supported by cogserve", "best_of",
                          "unsupported")  # fmt: skip
    if body.chat_template is not None or body.chat_template_kwargs:
        name = "chat_template" if body.chat_template is not None else "chat_template_kwargs"
        raise bad_request(f"{name} is not supported: CogVLM's prompts come from `template` (chat, vqa or base)",
                          name, "unsupported")  # fmt: skip
    if not body.add_generation_prompt or body.continue_final_message:
        name = "continue_final_message" if body.continue_final_message else "add_generation_prompt"
        raise bad_request(f"{name} is not supported: the prompt always ends where the answer starts", name,
                          "unsupported")  # fmt: skip


class ChatHandler:
    """Per-server state a chat completion needs; one instance per app."""

    def __init__(self, state):
        self.state = state
        self._token_bytes: TokenBytes | None = None  # built once the tokenizer has loaded; caches per token

    @property
    def token_bytes(self) -> TokenBytes:
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self.state.processor.tokenizer)
        return self._token_bytes

    async def build_prompt(self, body: ChatCompletionRequest) -> PromptInputs:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            conversation, image_url = parse_messages(messages)
        except PromptError as err:
            raise bad_request(str(err), "messages") from err
        if image_url:
            conversation = replace(conversation, image=await self.state.fetcher.load(image_url))
            for seconds in self.state.fetcher.fetch_seconds:
                self.state.metrics.image_fetch.observe(seconds)
            self.state.fetcher.fetch_seconds.clear()
        # preprocessing (resize, normalise) and tokenisation: off the event loop
        return await asyncio.to_thread(self.state.processor.build, conversation, body.template)

    def bad_word_ids(self, words: list[str]) -> tuple[tuple[int, ...], ...]:
        """vLLM's bad_words in the model's tokens: each word on its own and after a space."""
        if len(words) > MAX_BAD_WORDS:
            raise bad_request(f"bad_words holds at most {MAX_BAD_WORDS} words, got {len(words)}", "bad_words")
        if blank := [w for w in words if not w.strip()]:
            raise bad_request(f"bad_words must be words, got {blank[0]!r}", "bad_words")
        return tuple(ids for word in words for ids in self.state.processor.word_token_ids(word))

    def check_request(self, prompt: PromptInputs, params: SamplingParams) -> SamplingParams:
        """What needs the model: the engine checks the same, but by then a stream has said 200.
        Returns `params` with the checkpoint's default max_tokens where the request set none,
        capped to the context the prompt leaves (vLLM's way with a default)."""
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
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt.num_tokens + (params.max_tokens or 0)} tokens ({prompt.num_tokens} in the messages, image "
                f"slots included, {params.max_tokens or 0} in the completion). Please reduce the length of the "
                "messages or the completion.",
                "messages",
                "context_length_exceeded",
            )
        return params

    async def __call__(self, body: ChatCompletionRequest, request: Request):
        state = self.state
        arrival = time.monotonic()
        state.check_accepting()
        if body.model != state.served_model_name:
            raise model_not_found(body.model)
        refuse_unsupported(body)
        params = sampling_params(body, state.config.server.max_n, state.generation_defaults)
        if body.bad_words:
            params = replace(params, bad_word_ids=self.bad_word_ids(body.bad_words))
        if (constraint := output_constraint(body)) is not None:
            try:
                params = replace(params, constraint=constraint)
                # compiled off the event loop (up to seconds for a large schema); the engine's is then a cache hit
                await asyncio.to_thread(state.engine.grammars.compile, constraint)
            except ParamError as err:
                raise bad_request(str(err), err.field) from err
        prompt = await self.build_prompt(body)
        check_truncation(body, prompt)
        params = self.check_request(prompt, params)
        if state.engine.num_waiting >= state.config.server.max_queued_requests:
            raise unavailable(f"the queue is full ({state.config.server.max_queued_requests} waiting); retry")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        state.metrics.prompt_tokens.inc(prompt.num_tokens)
        outputs = state.engine.generate(request_id, prompt, params)
        logprobs = fmt.LogprobFormatter(self.token_bytes, body.return_tokens_as_token_ids)
        context = _Context(request_id, int(time.time()), body, prompt.num_tokens, arrival, state, logprobs)
        if body.stream:
            return StreamingResponse(context.stream(outputs), media_type="text/event-stream")
        return await context.collect(outputs, request)


async def _client_gone(request: Request) -> None:
    """Returns once the client disconnects: its body is read, so the next ASGI message is that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Context:
    def __init__(self, request_id, created, body: ChatCompletionRequest, num_prompt_tokens, arrival, state,
                 logprobs: fmt.LogprobFormatter):  # fmt: skip
        self.request_id, self.created, self.body = request_id, created, body
        self.model = state.served_model_name
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival = arrival
        self.state = state
        self.metrics = state.metrics
        self.logprobs = logprobs
        self.last_token_time: float | None = None
        self.num_finished = 0  # of the n completions

    def _observe(self, output) -> None:
        now = time.monotonic()
        m = self.metrics
        if self.last_token_time is None:
            m.time_to_first_token.observe(now - self.arrival)
        else:
            m.inter_token_latency.observe(now - self.last_token_time)
        self.last_token_time = now
        if output.queue_time_s is not None:
            m.request_queue_time.observe(output.queue_time_s)
        m.generation_tokens.inc(len(output.new_token_ids))
        if output.finished:
            m.e2e_request_latency.observe(now - self.arrival)
            m.finished(output.finish_reason)
            self.num_finished += 1

    def _close(self) -> None:
        """Completions that did not finish (client gone, timeout, engine stopped) count as aborted, as
        vLLM's request_success_total{finished_reason="abort"} does."""
        for _ in range(self.body.n - self.num_finished):
            self.metrics.finished("abort")
        self.num_finished = self.body.n

    async def _timed(self, outputs: AsyncIterator) -> AsyncIterator:
        async with asyncio.timeout(self.state.config.server.request_timeout_s):
            async for output in outputs:
                yield output

    async def collect(self, outputs: AsyncIterator, request: Request) -> JSONResponse:
        """The whole answer, unless the client leaves first: then its sequences are aborted (closing
        `outputs` does it) instead of generating to max_tokens for no one, as vLLM does."""
        gather = asyncio.create_task(self._gather(outputs))
        gone = asyncio.create_task(_client_gone(request))
        try:
            await asyncio.wait({gather, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done() and gone.exception() is not None:  # the connection cannot be watched: just answer
                await asyncio.wait({gather})
        finally:
            gone.cancel()
            if not gather.done():  # the client left (or this handler was cancelled)
                gather.cancel()
        try:
            return await gather
        except asyncio.CancelledError:  # nginx's 499: nobody reads it, the access log and metrics do
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)

    async def _gather(self, outputs: AsyncIterator) -> JSONResponse:
        n = self.body.n
        finals, logprobs = [None] * n, [[] for _ in range(n)]
        prompt_logprobs = None  # the prompt's, on the first output of completion 0 (every completion has them)
        try:
            async for output in self._timed(outputs):
                self._observe(output)
                logprobs[output.index] += output.new_logprobs
                if output.prompt_logprobs is not None and output.index == 0:
                    prompt_logprobs = output.prompt_logprobs
                if output.finished:
                    finals[output.index] = output
        except TimeoutError as err:
            raise APIError(408, f"request timed out after {self.state.config.server.request_timeout_s} s",
                           code="timeout") from err  # fmt: skip
        except EngineDeadError as err:
            raise APIError(500, str(err), code="engine_dead") from err
        except ValueError as err:
            raise bad_request(str(err)) from err
        finally:
            await outputs.aclose()
            self._close()
        want_logprobs = self.body.logprobs
        choices = [
            fmt.choice(i, out.text, out.finish_reason, self.logprobs.content(logprobs[i]) if want_logprobs else None)
            for i, out in enumerate(finals)
        ]
        completion_tokens = sum(len(out.token_ids) for out in finals)
        body = fmt.completion(self.request_id, self.created, self.model, choices,
                              fmt.usage(self.num_prompt_tokens, completion_tokens))  # fmt: skip
        if self.body.prompt_logprobs is not None:  # vLLM's place for them: beside the choices
            body["prompt_logprobs"] = self.logprobs.prompt(prompt_logprobs or [])
        return JSONResponse(body)

    async def stream(self, outputs: AsyncIterator) -> AsyncIterator[str]:
        rid, created, model = self.request_id, self.created, self.model
        options = self.body.stream_options
        with_usage = bool(options and options.include_usage)
        continuous = with_usage and options.continuous_usage_stats  # vLLM's: the usage so far in every chunk
        completion_tokens = 0

        def chunk(choice: dict) -> str:
            so_far = fmt.usage(self.num_prompt_tokens, completion_tokens) if continuous else None
            return fmt.chunk(rid, created, model, [choice], with_usage, so_far)

        try:
            for i in range(self.body.n):
                yield chunk(fmt.delta_choice(i, {"role": "assistant", "content": ""}))
            async for output in self._timed(outputs):
                self._observe(output)
                completion_tokens += len(output.new_token_ids)
                logprobs = None
                if self.body.logprobs and output.new_logprobs:
                    logprobs = self.logprobs.content(output.new_logprobs)
                if output.new_text or logprobs:
                    yield chunk(fmt.delta_choice(output.index, {"content": output.new_text}, None, logprobs))
                if output.finished:
                    yield chunk(fmt.delta_choice(output.index, {}, output.finish_reason))
            if with_usage:
                yield fmt.usage_chunk(rid, created, model, fmt.usage(self.num_prompt_tokens, completion_tokens))
        except (TimeoutError, EngineDeadError, ValueError) as err:
            status = 408 if isinstance(err, TimeoutError) else 500 if isinstance(err, EngineDeadError) else 400
            timeout_s = self.state.config.server.request_timeout_s
            message = f"request timed out after {timeout_s} s" if status == 408 else str(err)
            yield f"data: {json.dumps(APIError(status, message).body())}\n\n"
        except Exception:  # noqa: BLE001 -- the 200 is sent: the stream must still end with an error and [DONE]
            logger.exception("stream %s failed", rid)
            error = APIError(500, f"internal error (request id {rid})", code="internal_error")
            yield f"data: {json.dumps(error.body())}\n\n"
        finally:
            await outputs.aclose()
            self._close()
        yield fmt.DONE
