"""POST /v1/chat/completions: request -> conversation -> prompt -> engine stream -> OpenAI shapes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import StreamingResponse

from model.processor import PromptError, PromptInputs
from model.sampling_params import MAX_LOGPROBS
from server import openai_format as fmt
from server.answer import Answer
from server.conversation import parse_messages
from server.errors import bad_request
from server.handler import Handler
from server.protocol import ChatCompletionRequest


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


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    if body.tools or body.functions or body.tool_choice not in (None, "none"):
        raise bad_request("tool and function calling are not supported by CogVLM", "tools", "unsupported")
    if body.echo:  # vLLM's chat echo repeats an assistant-last message, which CogVLM's templates refuse
        raise bad_request("echo is not supported by cogserve's chat completions", "echo", "unsupported")
    if body.chat_template is not None or body.chat_template_kwargs:
        name = "chat_template" if body.chat_template is not None else "chat_template_kwargs"
        raise bad_request(f"{name} is not supported: CogVLM's prompts come from `template` (chat, vqa or base)",
                          name, "unsupported")  # fmt: skip
    if not body.add_generation_prompt or body.continue_final_message:
        name = "continue_final_message" if body.continue_final_message else "add_generation_prompt"
        raise bad_request(f"{name} is not supported: the prompt always ends where the answer starts", name,
                          "unsupported")  # fmt: skip


class ChatHandler(Handler):
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

    async def __call__(self, body: ChatCompletionRequest, request: Request):
        state = self.state
        arrival = time.monotonic()
        self.admit(body)
        refuse_unsupported(body)
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {body.top_logprobs}",
                              "top_logprobs")  # fmt: skip
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        use_completion = body.max_completion_tokens is not None
        params = await self.params(
            body,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            max_tokens=body.max_completion_tokens if use_completion else body.max_tokens,
            max_tokens_field="max_completion_tokens" if use_completion else "max_tokens",
        )
        prompt = await self.build_prompt(body)
        check_truncation(body, prompt)
        params = self.check_request(prompt, params)
        self.check_queue()
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        state.metrics.prompt_tokens.inc(prompt.num_tokens)
        outputs = state.engine.generate(request_id, prompt, params)
        answer = ChatAnswer(request_id, state, arrival, body, prompt.num_tokens, self.token_bytes)
        if body.stream:
            return StreamingResponse(answer.stream(outputs), media_type="text/event-stream")
        return await answer.collect(outputs, request)


class ChatAnswer(Answer):
    """chat.completion and chat.completion.chunk shapes."""

    def __init__(self, request_id, state, arrival, body: ChatCompletionRequest, num_prompt_tokens, token_bytes):
        super().__init__(request_id, state, arrival, body.n, num_prompt_tokens)
        self.body = body
        self.logprobs = fmt.LogprobFormatter(token_bytes, body.return_tokens_as_token_ids)

    async def json_body(self, outputs: AsyncIterator) -> dict:
        n = self.body.n
        finals, logprobs = [None] * n, [[] for _ in range(n)]
        prompt_logprobs = None  # the prompt's, on the first output of completion 0 (every completion has them)
        async for output in self.observed(outputs):
            logprobs[output.index] += output.new_logprobs
            if output.prompt_logprobs is not None and output.index == 0:
                prompt_logprobs = output.prompt_logprobs
            if output.finished:
                finals[output.index] = output
        want_logprobs = self.body.logprobs
        choices = [
            fmt.choice(i, out.text, out.finish_reason, self.logprobs.content(logprobs[i]) if want_logprobs else None)
            for i, out in enumerate(finals)
        ]
        completion_tokens = sum(len(out.token_ids) for out in finals)
        answer = fmt.completion(self.request_id, self.created, self.model, choices,
                              fmt.usage(self.num_prompt_tokens, completion_tokens))  # fmt: skip
        if self.body.prompt_logprobs is not None:  # vLLM's place for them: beside the choices
            answer["prompt_logprobs"] = self.logprobs.prompt(prompt_logprobs or [])
        return answer

    async def chunks(self, outputs: AsyncIterator) -> AsyncIterator[str]:
        rid, created, model = self.request_id, self.created, self.model
        options = self.body.stream_options
        with_usage = bool(options and options.include_usage)
        continuous = with_usage and options.continuous_usage_stats  # vLLM's: the usage so far in every chunk
        completion_tokens = 0

        def chunk(choice: dict) -> str:
            so_far = fmt.usage(self.num_prompt_tokens, completion_tokens) if continuous else None
            return fmt.chunk(rid, created, model, [choice], with_usage, so_far)

        for i in range(self.body.n):
            yield chunk(fmt.delta_choice(i, {"role": "assistant", "content": ""}))
        async for output in self.observed(outputs):
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
