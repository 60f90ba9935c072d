"""OpenAI response shapes: chat.completion, chat.completion.chunk, text_completion, logprobs (the
chat API's and the completions API's), usage. Plain dicts."""

from __future__ import annotations

import json

from model.batch import PromptLogprob, SampledToken
from server.token_bytes import TokenBytes

# one token of the completions API's logprobs: (token id, its logprob or None, the K best or None)
LegacyStep = tuple[int, float | None, list[tuple[int, float]] | None]


class LogprobFormatter:
    """token: the token's text (half a character shows as U+FFFD), or "token_id:N" when asked;
    bytes: its raw bytes, which concatenated give the completion's UTF-8 (server/token_bytes.py)."""

    def __init__(self, token_bytes: TokenBytes, as_token_ids: bool):
        self.token_bytes = token_bytes
        self.as_token_ids = as_token_ids

    def text(self, token_id: int) -> str:
        if self.as_token_ids:
            return f"token_id:{token_id}"
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.text(token_id), "logprob": max(logprob, -9999.0),
                "bytes": list(self.token_bytes(token_id))}  # fmt: skip

    def content(self, tokens: list[SampledToken]) -> dict:
        return {"content": [
            {**self.entry(t.token_id, t.logprob), "top_logprobs": [self.entry(i, lp) for i, lp in t.top_logprobs or []]}
            for t in tokens
        ]}  # fmt: skip

    def prompt(self, entries: list[PromptLogprob | None]) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt position, {token id: {logprob, rank, decoded_token}}
        for the K likeliest tokens and the prompt's own (keys are strings, as JSON's are)."""

        def one(token_id: int, logprob: float, rank: int) -> dict:
            text = self.entry(token_id, logprob)["token"]
            return {"logprob": max(logprob, -9999.0), "rank": rank, "decoded_token": text}

        out = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            at = {str(t): one(t, lp, rank) for rank, (t, lp) in enumerate(e.top_logprobs, start=1)}
            at[str(e.token_id)] = one(e.token_id, e.logprob, e.rank)
            out.append(at)
        return out

    def legacy(self, steps: list[LegacyStep], k: int, text_offset: int = 0) -> dict:
        """The completions API's logprobs, as vLLM writes them: per token its text, its logprob (None
        where nothing predicts it: BOS), {text: logprob} for itself and the K best, and its
        offset in the text, counted from `text_offset` in token text lengths."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, logprob, top in steps:
            token = self.text(token_id)
            out["text_offset"].append(text_offset)
            text_offset += len(token)
            out["tokens"].append(token)
            if logprob is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(max(logprob, -9999.0))
            best: dict[str, float] = {}
            for t, lp in [(token_id, logprob), *(top or [])[:k]]:
                best.setdefault(self.text(t), max(lp, -9999.0))
            out["top_logprobs"].append(best)
        return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion(request_id: str, created: int, model: str, choices: list[dict], usage_: dict,
               object_: str = "chat.completion") -> dict:  # fmt: skip
    return {"id": request_id, "object": object_, "created": created, "model": model,
            "choices": choices, "usage": usage_}  # fmt: skip


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}  # fmt: skip


def text_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    """A text_completion's choice; in a stream, its text is the delta."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chunk(request_id: str, created: int, model: str, choices: list[dict], with_usage: bool,
          usage_: dict | None = None, object_: str = "chat.completion.chunk") -> str:  # fmt: skip
    """with_usage: the chunk has a "usage" key, null unless `usage_` (continuous usage stats) is given."""
    body = {"id": request_id, "object": object_, "created": created, "model": model, "choices": choices}
    if with_usage:
        body["usage"] = usage_
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def delta_choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def usage_chunk(request_id: str, created: int, model: str, usage_: dict, object_: str = "chat.completion.chunk") -> str:
    """The stream's last chunk with include_usage: no choices, the whole usage."""
    return chunk(request_id, created, model, [], True, usage_, object_)


DONE = "data: [DONE]\n\n"
