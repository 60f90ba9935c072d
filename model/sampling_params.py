"""Per-request sampling parameters, with the names and defaults of vLLM / the OpenAI API."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20


class ParamError(ValueError):
    """A parameter a user can fix; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per request
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens with this much probability
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0  # drop tokens below min_p x the best token's probability
    presence_penalty: float = 0.0  # -2..2, on tokens generated so far
    frequency_penalty: float = 0.0  # -2..2, per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # > 0; divides positive logits of prompt and generated tokens
    seed: int | None = None  # per-request generator: reproducible whatever else is in the batch
    max_tokens: int | None = None  # None: until max_model_len
    min_tokens: int = 0  # stop tokens are masked until this many tokens exist
    stop: tuple[str, ...] = ()  # stop strings, excluded from the output text
    stop_token_ids: tuple[int, ...] = ()  # stop on these besides the checkpoint's eos ids
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; K: the sampled token's logprob and the K best

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def fail(name: str, rule: str, value) -> None:
            raise ParamError(f"{name} must be {rule}, got {value!r}")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", "an integer >= 1", self.n)
        if self.temperature < 0:
            fail("temperature", ">= 0", self.temperature)
        if not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1]", self.top_p)
        if not isinstance(self.top_k, int) or self.top_k < -1:
            fail("top_k", "-1, 0 (off) or a positive integer", self.top_k)
        if not 0 <= self.min_p <= 1:
            fail("min_p", "in [0, 1]", self.min_p)
        if not -2 <= self.presence_penalty <= 2:
            fail("presence_penalty", "in [-2, 2]", self.presence_penalty)
        if not -2 <= self.frequency_penalty <= 2:
            fail("frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "> 0", self.repetition_penalty)
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", "an integer >= 1", self.max_tokens)
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            fail("logprobs", f"in [0, {MAX_LOGPROBS}]", self.logprobs)
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "a list of non-empty strings", self.stop)
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "a list of token ids >= 0", self.stop_token_ids)
        if self.seed is not None and not isinstance(self.seed, int):
            fail("seed", "an integer", self.seed)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def effective_top_k(self) -> int:
        return 0 if self.top_k in (0, -1) else self.top_k
