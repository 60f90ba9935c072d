"""OpenAI response shapes: chat.completion, chat.completion.chunk, logprobs, usage. Plain dicts."""

from __future__ import annotations

import json

from model.batch import PromptLogprob, SampledToken
from server.token_bytes import TokenBytes


class LogprobFormatter:
    """token: the token's text (half a character shows as U+FFFD), or "token_id:N" when asked;
    bytes: its raw bytes, which concatenated give the completion's UTF-8 (server/token_bytes.py)."""

    def __init__(self, token_bytes: TokenBytes, as_token_ids: bool):
        self.token_bytes = token_bytes
        self.as_token_ids = as_token_ids

    def entry(self, token_id: int, logprob: float) -> dict:
        data = self.token_bytes(token_id)
        text = f"token_id:{token_id}" if self.as_token_ids else data.decode("utf-8", errors="replace")
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(data)}

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


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion(request_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}  # fmt: skip


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}  # fmt: skip


def chunk(request_id: str, created: int, model: str, choices: list[dict], with_usage: bool,
          usage_: dict | None = None) -> str:  # fmt: skip
    """with_usage: the chunk has a "usage" key, null unless `usage_` (continuous usage stats) is given."""
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices}  # fmt: skip
    if with_usage:
        body["usage"] = usage_
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def delta_choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def usage_chunk(request_id: str, created: int, model: str, usage_: dict) -> str:
    """The stream's last chunk with include_usage: no choices, the whole usage."""
    return chunk(request_id, created, model, [], True, usage_)


DONE = "data: [DONE]\n\n"
