"""Structured output: a request's OutputConstraint (JSON schema, regex, choice, EBNF grammar)
compiled by xgrammar into a matcher that says, at each step, which tokens keep the text valid.

xgrammar is an optional package (`pip install 'cogserve[structured]'`); without it a constrained
request is refused with a 400. Compiling a schema takes tens of milliseconds (36 ms for a
40-property schema at the tiny model's 512 tokens, on this project's CPU machine) and grows with
the schema and the vocabulary, so the HTTP handler compiles on a worker thread before the request
reaches the engine thread, and the engine's compile is then a cache hit. A matcher runs on the
host: each step the engine fills one bitmask row ([ceil(V / 32)] int32, bit t set where token t
is allowed) per constrained row that samples, and advances the matcher by the token it sampled.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import torch

from model.sampling_params import OutputConstraint, ParamError

# xgrammar's cache of compiled grammars, in bytes: a compiled grammar keeps token masks for its
# states, which grow with the vocabulary (128k for CogVLM2)
CACHE_LIMIT_BYTES = 512 * 2**20
# Ours, by constraint, in front of it: xgrammar's cache skips the compile but not the spec's
# conversion to a grammar, 5 ms for a 40-property schema on this project's CPU machine, which the
# engine thread would pay again for every request and completion that the HTTP handler compiled
MAX_CACHED_CONSTRAINTS = 64
# xgrammar's errors start "[03:46:08] /project/cpp/regex_converter.cc:83: " (and its checks with
# "Check failed: (error.empty()) is false: "): nothing a user can act on
_ERROR_PREFIX = re.compile(r"^(\[[\d:]+\] \S+:\d+: )?(Check failed: .*? is false: )?")


def choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF for "exactly one of these strings": JSON's string escapes are the grammar's."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """Compiles constraints for one tokenizer and makes per-request matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self._tokenizer, self.vocab_size, self._stop_token_ids = tokenizer, vocab_size, stop_token_ids
        self._compiler = None  # see prepare()
        self._lock = threading.Lock()  # the HTTP handlers' worker threads and the engine thread share both caches
        self._batch = None  # xgrammar's BatchGrammarMatcher: the engine thread's alone
        self._space_dropped = False  # set with the compiler: see _build_compiler
        self._compiled: OrderedDict[OutputConstraint, object] = OrderedDict()  # LRU: MAX_CACHED_CONSTRAINTS

    @staticmethod
    def xgrammar(field: str = "response_format"):
        try:
            import xgrammar
        except ImportError as err:
            raise ParamError(f"{field}: structured outputs need the optional xgrammar package on the server "
                             "(pip install 'cogserve[structured]')", field) from err  # fmt: skip
        return xgrammar

    def prepare(self) -> bool:
        """Build the compiler now (the server's start), not on the first constrained request: it
        reads every token of the vocabulary (128k for CogVLM2). False without xgrammar."""
        try:
            self._build_compiler(self.xgrammar())
        except ParamError:
            return False
        return True

    def _build_compiler(self, xgr) -> None:
        with self._lock:
            if self._compiler is not None:
                return
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=list(self._stop_token_ids))  # fmt: skip
            # sentencepiece (CogVLM-17B's vicuna tokenizer) writes a word's leading space into its
            # token ("▁red") and drops the text's first one when decoding: the model answers
            # "▁red", the reply reads "red", and xgrammar sees " red"
            ids = self._tokenizer.encode("a", add_special_tokens=False)
            self._space_dropped = b"".join(info.decoded_vocab[i] for i in ids) == b" a"
            self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_LIMIT_BYTES)

    def compile(self, constraint: OutputConstraint):
        """The compiled grammar (cached); a ParamError naming the field where the spec is invalid."""
        xgr = self.xgrammar(constraint.field)
        self._build_compiler(xgr)
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is not None:
                self._compiled.move_to_end(constraint)
                return compiled
        compiled = self._compile(xgr, constraint)
        with self._lock:
            self._compiled[constraint] = compiled
            if len(self._compiled) > MAX_CACHED_CONSTRAINTS:
                self._compiled.popitem(last=False)
        return compiled

    def _compile(self, xgr, constraint: OutputConstraint):
        kind, spec = constraint.kind, constraint.spec
        try:
            if kind == "json":
                # NOTE: no free whitespace between JSON tokens (", " and ": " only): with it, a model
                # unsure how to go on can emit spaces and newlines until max_tokens (a known xgrammar
                # and vLLM failure); the text is the same JSON
                grammar = xgr.Grammar.from_json_schema(spec, any_whitespace=False)
            elif kind == "json_object":
                grammar = xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
            elif kind == "regex":
                grammar = xgr.Grammar.from_regex(spec)
            else:
                grammar = xgr.Grammar.from_ebnf(choice_grammar(spec) if kind == "choice" else spec)
        except (RuntimeError, ValueError) as err:  # xgrammar's parse errors
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(kind, kind)
            message = _ERROR_PREFIX.sub("", str(err).strip().splitlines()[0] if str(err).strip() else "")
            raise ParamError(f"{constraint.field}: invalid {what}: {message or type(err).__name__}",
                             constraint.field) from err  # fmt: skip
        if self._space_dropped:  # so the first token may be "▁red": the text the reply shows is still "red"
            grammar = xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= " "?'), grammar)
        return self._compiler.compile_grammar(grammar)

    def matcher(self, constraint: OutputConstraint):
        """A fresh matcher (one per completion: n > 1 gets n): at the start of the text."""
        return self.xgrammar(constraint.field).GrammarMatcher(self.compile(constraint))

    def bitmask(self, matchers: list) -> torch.Tensor:
        """[len(matchers), ceil(V / 32)] int32 on the host: each matcher's allowed next tokens.
        Filled by xgrammar's batch matcher, rows side by side over its threads: this is engine
        thread time between steps, and a row's cost grows with the vocabulary (128k for CogVLM2)."""
        xgr = self.xgrammar()
        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher()
        mask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        self._batch.batch_fill_next_token_bitmask(matchers, mask)
        return mask
