"""Incremental detokenization and stop strings.

Text is decoded from a sliding window of tokens (prefix_offset..end) and only the part past the
window's already-emitted prefix is new, so sentencepiece's leading-space rule and byte-level BPE
merges come out as a full decode would. A chunk whose last character is U+FFFD is held back:
with byte fallback a multi-byte character spans several tokens and must never be emitted half.

Stop strings may span token boundaries: the text is searched where a stop string could have
completed, the match and everything after it are cut, and while the request runs the last
len(longest stop) - 1 characters are held back so that no prefix of a stop string is streamed
and then retracted. Before min_tokens tokens exist no stop string ends the text, as in vLLM: a
stop string completed earlier stays in the output.

NOTE: tokenizers' DecodeStream would do the windowing in Rust, but it raises on a byte sequence
that is not valid UTF-8 ("Invalid prefix encountered"), which a sampled model does produce.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), min_tokens: int = 0, keep_stop: bool = False,
                 skip_special_tokens: bool = True):  # fmt: skip
        self.tokenizer = tokenizer
        # NOTE: the Rust decoder directly: transformers' decode() wrapper costs 4x the decode
        # itself, twice per token per request (measured: 14 of 17 ms over 1024 tokens).
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.clean_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.stop = stop
        self.min_tokens = min_tokens
        self.keep_stop = keep_stop  # include_stop_str_in_output: cut after the stop string, not before
        self.skip_special = skip_special_tokens
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # decoded so far (stop string cut once found)
        self.num_emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if self.backend is None:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)
        text = self.backend.decode(ids, skip_special_tokens=self.skip_special)
        return self.tokenizer.clean_up_tokenization(text) if self.clean_up else text

    def add(self, token_ids: list[int]) -> None:
        """Append tokens; sets self.stopped if a stop string completed."""
        if self.stopped:
            return
        self.token_ids += token_ids
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            self._append(new)

    def _append(self, new: str) -> None:
        old_len = len(self.text)
        self.text += new
        if len(self.token_ids) < self.min_tokens:
            return
        for stop in self.stop:
            at = self.text.find(stop, max(0, old_len - len(stop) + 1))
            if at != -1:
                self.text = self.text[: at + len(stop) if self.keep_stop else at]
                self.stopped = True
        # NOTE: two stops found in one chunk: the loop keeps the earliest cut, as text only shrinks

    def flush(self) -> None:
        """At the end: whatever the window still holds (a trailing partial character included)."""
        if self.stopped or self.read_offset == len(self.token_ids):
            return
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        self.read_offset = len(self.token_ids)
        if len(full) > len(prefix):
            self._append(full[len(prefix) :])

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, the stop-string hold-back stays behind."""
        end = len(self.text) if finished or self.stopped else max(self.num_emitted, len(self.text) - self.hold_back)
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta
