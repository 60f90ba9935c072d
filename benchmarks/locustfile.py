"""Load test for cogserve (or any OpenAI-compatible server) with locust.

    locust -f benchmarks/locustfile.py --headless -u 20 -r 5 -t 60s --host http://127.0.0.1:8000

Users send chat completions, with images (deterministic synthetic PNGs as data URIs, or URLs
under COGSERVE_IMAGE_BASE_URL) and text-only, streaming and not, with think time. Besides the
HTTP entries, locust reports "TTFT" (first streamed token) and "E2E" (whole completion) entries.
A response that is not a valid completion counts as a failure.

Environment: COGSERVE_MODEL (cogvlm-tiny), COGSERVE_IMAGE_SHARE (0.5), COGSERVE_STREAM_SHARE (0.5),
COGSERVE_MAX_TOKENS (64), COGSERVE_IMAGE_SIZE (490), COGSERVE_THINK_TIME ("0.5,2" seconds),
COGSERVE_IMAGE_BASE_URL (unset: data URIs), COGSERVE_API_KEY (unset).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_images import data_uri, synthetic_image  # noqa: E402

MODEL = os.environ.get("COGSERVE_MODEL", "cogvlm-tiny")
IMAGE_SHARE = float(os.environ.get("COGSERVE_IMAGE_SHARE", "0.5"))
STREAM_SHARE = float(os.environ.get("COGSERVE_STREAM_SHARE", "0.5"))
MAX_TOKENS = int(os.environ.get("COGSERVE_MAX_TOKENS", "64"))
IMAGE_SIZE = int(os.environ.get("COGSERVE_IMAGE_SIZE", "490"))
THINK_MIN, THINK_MAX = (float(x) for x in os.environ.get("COGSERVE_THINK_TIME", "0.5,2").split(","))
IMAGE_BASE_URL = os.environ.get("COGSERVE_IMAGE_BASE_URL")
API_KEY = os.environ.get("COGSERVE_API_KEY")
QUESTIONS = ["What is in the image?", "Describe the picture.", "How many shapes are there?",
             "Where is the red circle?", "What colour is the square?"]  # fmt: skip
NUM_IMAGES = 8
IMAGES = [f"{IMAGE_BASE_URL}/{i}.png" if IMAGE_BASE_URL else data_uri(synthetic_image(i, IMAGE_SIZE))
          for i in range(NUM_IMAGES)]  # fmt: skip


def report(kind: str, name: str, seconds: float) -> None:
    events.request.fire(request_type=kind, name=name, response_time=seconds * 1000, response_length=0,
                        exception=None, context={})  # fmt: skip


class ChatUser(HttpUser):
    wait_time = between(THINK_MIN, THINK_MAX)

    def on_start(self) -> None:
        self.rng = random.Random(id(self))
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def body(self) -> tuple[dict, str]:
        question = self.rng.choice(QUESTIONS)
        if self.rng.random() < IMAGE_SHARE:
            content = [{"type": "text", "text": question},
                       {"type": "image_url", "image_url": {"url": self.rng.choice(IMAGES)}}]  # fmt: skip
            kind = "image"
        else:
            content, kind = question, "text"
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
                "temperature": 0.7}  # fmt: skip
        return body, kind

    @task
    def chat(self) -> None:
        body, kind = self.body()
        if self.rng.random() < STREAM_SHARE:
            self.streamed(body, f"chat {kind} stream")
        else:
            self.whole(body, f"chat {kind}")

    def whole(self, body: dict, name: str) -> None:
        start = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, name=name, catch_response=True) as response:
            try:
                data = response.json()
                choice = data["choices"][0]
                ok = (
                    data["object"] == "chat.completion"
                    and isinstance(choice["message"]["content"], str)
                    and choice["finish_reason"] in ("stop", "length")
                    and data["usage"]["completion_tokens"] >= 1
                )
            except (ValueError, KeyError, IndexError, TypeError):
                ok = False
            if not ok:
                response.failure(f"not a valid completion (HTTP {response.status_code}): {response.text[:200]}")
                return
        report("E2E", name, time.perf_counter() - start)

    def streamed(self, body: dict, name: str) -> None:
        start, first, done, finished = time.perf_counter(), None, False, False
        body = {**body, "stream": True}
        with self.client.post("/v1/chat/completions", json=body, name=name, stream=True,
                              catch_response=True) as response:  # fmt: skip
            try:
                for line in response.iter_lines():
                    if not line:
                        continue
                    text = line.decode() if isinstance(line, bytes) else line
                    if text == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(text.removeprefix("data: "))
                    for choice in chunk["choices"]:
                        if choice["delta"].get("content") and first is None:
                            first = time.perf_counter()
                        finished |= choice["finish_reason"] in ("stop", "length")
            except (ValueError, KeyError) as err:
                response.failure(f"bad stream: {err}")
                return
            if response.status_code != 200 or not (done and finished):
                response.failure(f"stream ended without a finish reason and [DONE] (HTTP {response.status_code})")
                return
        if first is not None:
            report("TTFT", name, first - start)
        report("E2E", name, time.perf_counter() - start)
