"""POST /v1/completions: text or token-id prompts taken as they are (no template, no image) ->
engine -> text_completion shapes, as vLLM serves them:
- `prompt` is a string or token ids, or a list of either; each prompt gets n completions, and
  choice `prompt * n + i` is prompt's i-th;
- `echo` puts the prompt before its completion, and with `logprobs` the prompt's logprobs before
  the completion's (BOS has none); with max_tokens 0 the answer is the prompt alone. lm-eval's
  loglikelihood asks this way: token-id prompts, echo, logprobs 1;
- `logprobs` is the legacy API's K: tokens, token_logprobs, top_logprobs, text_offset."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import StreamingResponse

from model.batch import PromptLogprob
from model.processor import PromptError, PromptInputs
from server import openai_format as fmt
from server.answer import Answer
from server.errors import bad_request
from server.handler import Handler
from server.protocol import CompletionRequest

OBJECT = "text_completion"


@dataclass(frozen=True)
class Prompt:
    inputs: PromptInputs
    text: str  # what echo writes: the request's string, or its (kept) token ids decoded


def prompt_list(prompt: str | list) -> list[str | list[int]]:
    """The request's prompts, each a string or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must be a string, token ids, or a non-empty list of either", "prompt")
    return [prompt] if isinstance(prompt[0], int) else list(prompt)


def truncated(inputs: PromptInputs, keep: int | None, max_model_len: int) -> PromptInputs:
    """vLLM's truncate_prompt_tokens: a text prompt's last `keep` tokens (-1: the context's worth).
    A text prompt has no image, so the cut loses only text (chat refuses a cut, for its image)."""
    if keep is None:
        return inputs
    if keep == -1:
        keep = max_model_len
    if not 1 <= keep <= max_model_len:
        raise bad_request(f"truncate_prompt_tokens must be -1 or in [1, {max_model_len}] (the context), got {keep}",
                          "truncate_prompt_tokens")  # fmt: skip
    if inputs.num_tokens <= keep:
        return inputs
    ids = inputs.input_ids[-keep:]
    return replace(inputs, input_ids=ids, token_type_ids=inputs.token_type_ids[-keep:],
                   position_ids=list(range(len(ids))))  # fmt: skip


async def merged(streams: list[AsyncIterator], n: int) -> AsyncIterator:
    """The outputs of one engine request per prompt as they come, each re-indexed to its choice
    (prompt * n + i). Closing this cancels the pumps, and a cancelled pump's stream ends in its
    own `finally`, which aborts its request. NOTE: nothing here awaits once closing: a client
    that hangs up leaves the answer's generators to the event loop's finalizer, one task each and
    in no set order, and an await in this `finally` let another's aclose() find this generator
    still running ("aclose(): asynchronous generator is already running"), skipping the aborts."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(which: int, stream: AsyncIterator) -> None:
        try:
            async for output in stream:
                queue.put_nowait(replace(output, index=which * n + output.index))
            queue.put_nowait(end)
        except Exception as err:  # noqa: BLE001 -- handed to the reader, who raises it
            queue.put_nowait(err)

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while (item := await queue.get()) is not end:
                if isinstance(item, Exception):
                    raise item
                yield item
    finally:
        for task in pumps:
            task.cancel()


class CompletionHandler(Handler):
    def build_prompts(self, body: CompletionRequest, given: list[str | list[int]]) -> list[Prompt]:
        processor = self.state.processor
        prompts = []
        for i, prompt in enumerate(given):
            where = f"prompt {i}: " if len(given) > 1 else ""
            try:
                if isinstance(prompt, str):
                    inputs = processor.build_text(prompt, body.add_special_tokens)
                else:
                    inputs = processor.build_token_ids(prompt)
            except PromptError as err:
                raise bad_request(f"{where}{err}", "prompt") from err
            if inputs.num_tokens == 0:
                raise bad_request(f"{where}the prompt has no tokens", "prompt")
            kept = truncated(inputs, body.truncate_prompt_tokens, self.state.max_model_len)
            text = prompt if isinstance(prompt, str) and kept is inputs else None
            if text is None and body.echo:  # token ids, or a cut text: the tokens the model saw
                text = processor.tokenizer.decode(kept.input_ids, skip_special_tokens=False)
            prompts.append(Prompt(kept, text or ""))
        return prompts

    async def __call__(self, body: CompletionRequest, request: Request):
        state = self.state
        arrival = time.monotonic()
        self.admit(body)
        if body.suffix:
            raise bad_request("suffix is not supported: CogVLM has no fill-in-the-middle", "suffix", "unsupported")
        echo_only = body.echo and body.max_tokens == 0  # the prompt alone: one token is generated and dropped
        params = await self.params(body, logprobs=body.logprobs, max_tokens=1 if echo_only else body.max_tokens)
        if body.echo and body.logprobs is not None:  # the echoed prompt's logprobs, with the K best
            params = replace(params, prompt_logprobs=max(body.logprobs, body.prompt_logprobs or 0))
        given = prompt_list(body.prompt)
        self.check_queue(len(given))  # before tokenizing what would be refused
        prompts = await asyncio.to_thread(self.build_prompts, body, given)  # tokenisation: off the event loop
        per_prompt = [self.check_request(p.inputs, params, "prompt") for p in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        state.metrics.prompt_tokens.inc(sum(p.inputs.num_tokens for p in prompts))
        streams = [state.engine.generate(f"{request_id}-{i}", p.inputs, params_i)
                   for i, (p, params_i) in enumerate(zip(prompts, per_prompt, strict=True))]  # fmt: skip
        answer = CompletionAnswer(request_id, state, arrival, body, prompts, self.token_bytes, echo_only)
        outputs = merged(streams, body.n)
        if body.stream:
            return StreamingResponse(answer.stream(outputs), media_type="text/event-stream")
        return await answer.collect(outputs, request)


class CompletionAnswer(Answer):
    """text_completion shapes, whole or streamed (a chunk per step per choice, its text the delta)."""

    def __init__(self, request_id, state, arrival, body: CompletionRequest, prompts: list[Prompt], token_bytes,
                 echo_only: bool):  # fmt: skip
        super().__init__(request_id, state, arrival, body.n * len(prompts), sum(p.inputs.num_tokens for p in prompts))
        self.body = body
        self.prompts = prompts
        self.echo_only = echo_only
        self.logprobs = fmt.LogprobFormatter(token_bytes, body.return_tokens_as_token_ids)

    def _prompt_of(self, choice: int) -> Prompt:
        return self.prompts[choice // self.body.n]

    @staticmethod
    def _prompt_steps(prompt: Prompt, entries: list[PromptLogprob | None] | None) -> list[fmt.LegacyStep]:
        entries = entries or [None] * prompt.inputs.num_tokens
        return [(t, None, None) if e is None else (t, e.logprob, e.top_logprobs)
                for t, e in zip(prompt.inputs.input_ids, entries, strict=True)]  # fmt: skip

    def _prompt_logprobs(self, entries: list[PromptLogprob | None] | None) -> list[dict | None]:
        """vLLM's prompt_logprobs (a choice's, in the completions API), K as the request asked: echo
        may have asked the engine for more."""
        k = self.body.prompt_logprobs
        cut = [None if e is None else replace(e, top_logprobs=e.top_logprobs[:k]) for e in entries or []]
        return self.logprobs.prompt(cut)

    @staticmethod
    def _steps(output) -> list[fmt.LegacyStep]:
        return [(t.token_id, t.logprob, t.top_logprobs) for t in output.new_logprobs]

    async def json_body(self, outputs: AsyncIterator) -> dict:
        body, k = self.body, self.body.logprobs
        finals = [None] * self.num_completions
        steps: list[list[fmt.LegacyStep]] = [[] for _ in finals]
        prompt_entries: list = [None] * len(finals)
        async for output in self.observed(outputs):
            steps[output.index] += self._steps(output)
            if output.prompt_logprobs is not None:
                prompt_entries[output.index] = output.prompt_logprobs
            if output.finished:
                finals[output.index] = output
        choices, completion_tokens = [], 0
        for i, out in enumerate(finals):
            text, tokens = ("", []) if self.echo_only else (out.text, steps[i])
            completion_tokens += 0 if self.echo_only else len(out.token_ids)
            if body.echo:
                prompt = self._prompt_of(i)
                text = prompt.text + text
                tokens = self._prompt_steps(prompt, prompt_entries[i]) + tokens
            choice = fmt.text_choice(i, text, out.finish_reason, None if k is None else self.logprobs.legacy(tokens, k))
            if body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs(prompt_entries[i])
            choices.append(choice)
        usage = fmt.usage(self.num_prompt_tokens, completion_tokens)
        return fmt.completion(self.request_id, self.created, self.model, choices, usage, OBJECT)

    async def chunks(self, outputs: AsyncIterator) -> AsyncIterator[str]:
        rid, created, model, k = self.request_id, self.created, self.model, self.body.logprobs
        options = self.body.stream_options
        with_usage = bool(options and options.include_usage)
        continuous = with_usage and options.continuous_usage_stats  # vLLM's: the choice's usage so far
        echoed: set[int] = set()
        offsets = [0] * self.num_completions  # each choice's next text_offset: the chunks join up as one answer
        generated = [0] * self.num_completions
        async for output in self.observed(outputs):
            i = output.index
            text, tokens = ("", []) if self.echo_only else (output.new_text, self._steps(output))
            generated[i] += 0 if self.echo_only else len(output.new_token_ids)
            if self.body.echo and i not in echoed:
                echoed.add(i)
                prompt = self._prompt_of(i)
                text = prompt.text + text
                tokens = self._prompt_steps(prompt, output.prompt_logprobs) + tokens
            if not (text or output.finished or (k is not None and tokens)):
                continue
            logprobs = None
            if k is not None:
                logprobs = self.logprobs.legacy(tokens, k, offsets[i])
                offsets[i] += sum(len(token) for token in logprobs["tokens"])
            so_far = fmt.usage(self._prompt_of(i).inputs.num_tokens, generated[i]) if continuous else None
            yield fmt.chunk(rid, created, model, [fmt.text_choice(i, text, output.finish_reason, logprobs)],
                            with_usage, so_far, OBJECT)  # fmt: skip
        if with_usage:
            usage = fmt.usage(self.num_prompt_tokens, sum(generated))
            yield fmt.usage_chunk(rid, created, model, usage, OBJECT)
