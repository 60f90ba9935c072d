"""The HTTP server's own cost, with the engine swapped for an instant fake: per request
(non-streaming, one token) and per streamed token. In-process ASGI, so no socket time is counted
on either side. Targets on CPU: under 2 ms per request and 50 us per streamed token.

    python benchmarks/api_overhead.py [--requests 300] [--tokens 400] [--endpoint chat|completions]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import httpx

from model.config import CogVLMConfig
from model.processor import Processor, load_tokenizer
from model.tiny_checkpoint import write_tiny_checkpoint
from server.api import AppState, build_app
from server.config import ServeConfig
from server.engine import RequestOutput
from server.media import ImageFetcher
from server.metrics import Metrics


class InstantEngine:
    """Yields `len` tokens of text "ab" at once; no model, no scheduling."""

    dead = None
    num_waiting = 0
    num_in_flight = 0

    async def generate(self, request_id, prompt, params):
        for index in range(params.n):
            count = params.max_tokens or 1
            for i in range(count):
                done = i == count - 1
                yield RequestOutput(request_id, index, [7], "ab", "ab" * (i + 1), [7] * (i + 1), prompt.num_tokens,
                                    finished=done, finish_reason="length" if done else None)  # fmt: skip


BODIES = {  # the same question, as a chat message and as a text prompt
    "chat": {"messages": [{"role": "user", "content": "What is in the image?"}]},
    "completions": {"prompt": "Question: What is in the image? Answer:"},
}


async def measure(app, requests: int, tokens: int, endpoint: str) -> tuple[float, float]:
    transport = httpx.ASGITransport(app=app)
    route = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        body = {"model": "bench", **BODIES[endpoint], "max_tokens": 1}
        for _ in range(20):
            await client.post(route, json=body)
        start = time.perf_counter()
        for _ in range(requests):
            response = await client.post(route, json=body)
        per_request = (time.perf_counter() - start) / requests
        assert response.status_code == 200, response.text
        stream_body = {**body, "max_tokens": tokens, "stream": True}
        start = time.perf_counter()
        async with client.stream("POST", route, json=stream_body) as response:
            chunks = len([line async for line in response.aiter_lines() if line.startswith("data: {")])
        streamed = time.perf_counter() - start
        assert chunks >= tokens
        return per_request, (streamed - per_request) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--endpoint", choices=sorted(BODIES), default="chat")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_checkpoint(tmp, 1)
        processor = Processor(load_tokenizer(tmp), CogVLMConfig.from_checkpoint(tmp))
    config = ServeConfig()
    state = AppState(config=config, served_model_name="bench", metrics=Metrics("bench"),
                     fetcher=ImageFetcher(config.media))  # fmt: skip
    state.engine, state.processor, state.max_model_len = InstantEngine(), processor, 2048
    per_request, per_token = asyncio.run(measure(build_app(state), args.requests, args.tokens, args.endpoint))
    print(f"{args.endpoint}: server cost per request (non-streaming, 1 token): {per_request * 1e3:.3f} ms "
          "(target < 2 ms)")  # fmt: skip
    print(f"server cost per streamed token: {per_token * 1e6:.1f} us (target < 50 us)")


if __name__ == "__main__":
    main()
