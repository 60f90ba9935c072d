"""Per-request sampling parameters, with the names and defaults of vLLM / the OpenAI API."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value
# Seeds seed a torch.Generator, which takes a 64-bit value: a larger one raised in the engine's step
# and stopped the engine for every request. vLLM's bounds.
SEED_RANGE = (-(2**63), 2**63 - 1)
# As vLLM: a temperature below GREEDY_BELOW samples greedily, and one below MIN_TEMPERATURE is raised to
# it: fp32 logits of ~30 divided by 1e-30 overflow to inf, and the softmax of inf is NaN.
GREEDY_BELOW = 1e-5
MIN_TEMPERATURE = 1e-2


# The forms of structured output (vLLM's structured_outputs): each names what `spec` holds.
CONSTRAINT_KINDS = {
    "json": "a JSON schema, as JSON text",
    "json_object": "nothing (any JSON object)",
    "regex": "a regular expression",
    "choice": "the strings the output must be one of",
    "grammar": "an EBNF grammar (GBNF, as llama.cpp's)",
}


class ParamError(ValueError):
    """A parameter a user can fix; the message names it, and `field` too where it is one field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class OutputConstraint:
    """Structured output: the text must match `spec` (server/grammars.py compiles it to a token
    mask for each step). Hashable: compiled grammars are cached by it."""

    kind: str  # a key of CONSTRAINT_KINDS
    spec: str | tuple[str, ...] = ""  # json / regex / grammar: text; choice: the strings; json_object: ""
    field: str = "structured_outputs"  # the request field it came from, for error messages

    def validate(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ParamError(f"{self.field}: unknown kind {self.kind!r}; one of {sorted(CONSTRAINT_KINDS)}",
                             self.field)  # fmt: skip
        if self.kind == "choice":
            choices = self.spec if isinstance(self.spec, tuple) else ()
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise ParamError(f"{self.field} must be a non-empty list of non-empty strings", self.field)
        elif self.kind != "json_object" and (not isinstance(self.spec, str) or not self.spec.strip()):
            raise ParamError(f"{self.field} must be {CONSTRAINT_KINDS[self.kind]}, got {self.spec!r}", self.field)


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
    include_stop_str_in_output: bool = False  # vLLM's: keep the stop string that ended the text
    skip_special_tokens: bool = True  # vLLM's: special tokens leave no text
    stop_token_ids: tuple[int, ...] = ()  # stop on these besides the checkpoint's eos ids
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; K: the sampled token's logprob and the K best
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias): added to the logits before sampling
    allowed_token_ids: tuple[int, ...] | None = None  # vLLM's: only these may be sampled; None: any token
    # vLLM's bad_words, tokenized (Processor.word_token_ids): a word's last token is masked wherever
    # the output so far ends with the rest of it (always, for a one-token word)
    bad_word_ids: tuple[tuple[int, ...], ...] = ()
    constraint: OutputConstraint | None = None  # structured output: a JSON schema, regex, choice or grammar
    # vLLM's prompt_logprobs: each prompt token's logprob given the ones before it, and the K best
    # there (None: none). The request's prompt is then computed whole, never read from the prefix cache.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def fail(name: str, rule: str, value) -> None:
            raise ParamError(f"{name} must be {rule}, got {value!r}", name)

        def is_int(value, low: int = 0, high: float = math.inf) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

        def is_real(value) -> bool:  # NaN and infinities pass every comparison below the wrong way
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        if not is_int(self.n, 1):
            fail("n", "an integer >= 1", self.n)
        if not is_real(self.temperature) or self.temperature < 0:
            fail("temperature", "a finite number >= 0", self.temperature)
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1]", self.top_p)
        if not is_int(self.top_k, -1):
            fail("top_k", "-1, 0 (off) or a positive integer", self.top_k)
        if not is_real(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "in [0, 1]", self.min_p)
        if not is_real(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
            fail("presence_penalty", "in [-2, 2]", self.presence_penalty)
        if not is_real(self.frequency_penalty) or not -2 <= self.frequency_penalty <= 2:
            fail("frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        if not is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "a finite number > 0", self.repetition_penalty)
        if self.max_tokens is not None and not is_int(self.max_tokens, 1):
            fail("max_tokens", "an integer >= 1", self.max_tokens)
        if not is_int(self.min_tokens):
            fail("min_tokens", "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and not is_int(self.logprobs, 0, MAX_LOGPROBS):
            fail("logprobs", f"in [0, {MAX_LOGPROBS}]", self.logprobs)
        if self.prompt_logprobs is not None and not is_int(self.prompt_logprobs, 0, MAX_LOGPROBS):
            fail("prompt_logprobs", f"in [0, {MAX_LOGPROBS}]", self.prompt_logprobs)
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "a list of non-empty strings", self.stop)
        if any(not is_int(t) for t in self.stop_token_ids):
            fail("stop_token_ids", "a list of token ids >= 0", self.stop_token_ids)
        if self.seed is not None and not is_int(self.seed, *SEED_RANGE):
            fail("seed", f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]", self.seed)
        for token_id, bias in self.logit_bias:
            if not is_int(token_id):
                fail("logit_bias", "keyed by token ids >= 0", token_id)
            if not is_real(bias) or abs(bias) > MAX_LOGIT_BIAS:
                fail("logit_bias", f"values in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", bias)
        if self.allowed_token_ids is not None and (
            not self.allowed_token_ids or any(not is_int(t) for t in self.allowed_token_ids)
        ):
            fail("allowed_token_ids", "a non-empty list of token ids >= 0", list(self.allowed_token_ids))
        if any(not word or any(not is_int(t) for t in word) for word in self.bad_word_ids):
            fail("bad_words", "words of token ids >= 0", self.bad_word_ids)
        if self.constraint is not None:
            self.constraint.validate()
            if self.ignore_eos:  # a complete text ends with the grammar's EOS: there is nothing after it
                raise ParamError("ignore_eos cannot be combined with structured outputs", "ignore_eos")

    def check_model(self, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        """What validation cannot know without the model: token ids past its vocabulary, and an
        allowed_token_ids whose every token one-token bad words or min_tokens mask (a row with
        nothing left to sample)."""
        if outside := sorted(t for t, _ in self.logit_bias if t >= vocab_size):
            raise ParamError(f"logit_bias holds token ids past the vocabulary (size {vocab_size}): {outside[:5]}",
                             "logit_bias")  # fmt: skip
        if outside := sorted(t for word in self.bad_word_ids for t in word if t >= vocab_size):
            raise ParamError(f"bad_words holds token ids past the vocabulary (size {vocab_size}): {outside[:5]}",
                             "bad_words")  # fmt: skip
        if self.allowed_token_ids is None:
            return
        allowed = set(self.allowed_token_ids)
        if outside := sorted(t for t in allowed if t >= vocab_size):
            raise ParamError(f"allowed_token_ids holds token ids past the vocabulary (size {vocab_size}): "
                             f"{outside[:5]}", "allowed_token_ids")  # fmt: skip
        banned = {word[0] for word in self.bad_word_ids if len(word) == 1}  # at every step
        if allowed <= banned:
            raise ParamError("bad_words rules out every token of allowed_token_ids", "allowed_token_ids")
        stops = set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_token_ids))
        if self.min_tokens and allowed <= stops | banned:
            raise ParamError(f"allowed_token_ids holds only stop tokens (and bad words), which min_tokens "
                             f"({self.min_tokens}) forbids before that many tokens", "allowed_token_ids")  # fmt: skip

    def child_seed(self, index: int) -> int | None:
        """The seed of completion `index` of n: seed + index, wrapped around the seed range."""
        if self.seed is None:
            return None
        low, high = SEED_RANGE
        return (self.seed + index - low) % (high - low + 1) + low

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def has_repetition_penalty(self) -> bool:  # divides the logits of every token seen so far
        return self.repetition_penalty != 1.0

    @property
    def has_additive_penalties(self) -> bool:  # frequency or presence: subtracted by output counts
        return bool(self.frequency_penalty or self.presence_penalty)

    @property
    def counts_tokens(self) -> bool:
        """Whether the penalties read how often each token occurred (and so the token in flight)."""
        return self.has_repetition_penalty or self.has_additive_penalties

    @property
    def reads_newest_token(self) -> bool:
        """Whether sampling reads the newest generated token, which a look-ahead step holds on the
        device: the penalties count it, and a bad word of two tokens or more may end after it."""
        return self.counts_tokens or any(len(word) > 1 for word in self.bad_word_ids)

    @property
    def effective_temperature(self) -> float:  # what the sampler divides by (greedy rows: unused)
        return max(self.temperature, MIN_TEMPERATURE)

    @property
    def effective_top_k(self) -> int:
        return 0 if self.top_k in (0, -1) else self.top_k
