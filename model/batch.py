"""What the scheduler hands the runner each step, and what comes back. Plain data, no tensors
(except a request's pixels, passed through untouched, and the runner's own handle to a step's
tokens on the device)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from model.processor import LANGUAGE_TOKEN_TYPE, PromptInputs
from model.sampling_params import SamplingParams


@dataclass
class SequenceData:
    """A request as the model sees it: prompt, sampling parameters, tokens generated so far.
    Created once per request; the scheduler appends to output_token_ids."""

    request_id: str
    prompt: PromptInputs
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt.num_tokens

    @property
    def num_tokens(self) -> int:  # NOTE: read several times per sequence per step: no property chain
        return len(self.prompt.input_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of prompt + output, without concatenating the two (a decode step
        asks for one token of a sequence that may be thousands long)."""
        prompt, n = self.prompt.input_ids, len(self.prompt.input_ids)
        if end <= n:
            return prompt[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return prompt[start:] + self.output_token_ids[: end - n]

    def positions(self, start: int, end: int) -> list[int]:
        """Prompt positions, then generated tokens continue from the last prompt position + 1."""
        prompt = self.prompt.position_ids
        head = prompt[start : min(end, len(prompt))]
        first_out = max(start, len(prompt))
        base = prompt[-1] + 1 - len(prompt)
        return head + [base + i for i in range(first_out, end)]

    def token_type(self, index: int) -> int:
        types = self.prompt.token_type_ids
        return types[index] if index < len(types) else LANGUAGE_TOKEN_TYPE


@dataclass
class ScheduledSequence:
    seq: SequenceData
    start: int  # first token computed this step (== tokens already in the KV cache)
    end: int  # one past the last; a sample is drawn when end == seq.num_tokens
    block_ids: list[int]  # the whole block table of the sequence

    @property
    def num_new_tokens(self) -> int:
        return self.end - self.start

    @property
    def needs_sample(self) -> bool:
        # end == num_tokens + 1 in a look-ahead step: the token at `start` is the one the step
        # still in flight sampled, not yet in output_token_ids (server/engine.py)
        return self.end >= self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """The only thing the runner sees: sequences in batch order, and requests that are gone."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # drop per-request runner state

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None  # of the sampled token, under the raw model distribution
    top_logprobs: list[tuple[int, float]] | None = None  # the K best, best first


@dataclass
class PromptLogprob:
    """vLLM's prompt_logprobs at one prompt position: the prompt's own token there, given the
    tokens before it, and the K likeliest tokens."""

    token_id: int
    logprob: float
    rank: int  # 1: the likeliest token
    top_logprobs: list[tuple[int, float]]  # the K best, best first


@dataclass
class RunnerOutput:
    """The tokens a step sampled. A step whose tokens are still on the device carries `pending`,
    which waits for that step alone and reads them, and `feed`, from which a look-ahead step
    takes its input tokens on the device. `prompt_logprobs`: the prompt positions this step
    computed for the requests that ask for them (read with the tokens)."""

    sampled: dict[str, SampledToken] = field(default_factory=dict)  # request_id -> token
    pending: Callable[[], dict[str, SampledToken]] | None = None
    feed: tuple | None = None  # ([B] int64 tokens on the device, {request_id: row})
    prompt_logprobs: dict[str, dict[int, PromptLogprob]] = field(default_factory=dict)  # request_id -> {position: ..}
    pending_prompt: Callable[[], dict[str, dict[int, PromptLogprob]]] | None = None

    def resolve(self) -> RunnerOutput:
        if self.pending is not None:
            self.sampled, self.pending = self.pending(), None
        if self.pending_prompt is not None:
            self.prompt_logprobs, self.pending_prompt = self.pending_prompt(), None
        return self
