"""Serving benchmark against any OpenAI-compatible server (cogserve, vLLM, LMDeploy).

Replays a seeded workload at a fixed request rate (Poisson arrivals) or a fixed concurrency,
streaming every request, and reports what vLLM's benchmark_serving reports, defined the same way:
request throughput, output tokens/s, TTFT (arrival to first token), TPOT ((e2e - TTFT) /
(output tokens - 1), per request), ITL (every gap between streamed chunks) and end-to-end
latency, at mean / p50 / p90 / p99, to the terminal and as JSON.

    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --model cogvlm-tiny \
        --num-prompts 200 --request-rate 4 --image-size 490 --result-json serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_images import data_uri, synthetic_image  # noqa: E402

WORDS = [
    "shape",
    "colour",
    "circle",
    "square",
    "triangle",
    "left",
    "right",
    "above",
    "below",
    "image",
    "picture",
    "describe",
    "count",
    "how",
    "many",
    "what",
    "where",
    "which",
    "is",
    "the",
    "a",
    "of",
    "in",
    "on",
]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def workload(args) -> list[dict]:
    rng = random.Random(args.seed)
    images = [data_uri(synthetic_image(args.seed * 1000 + i, args.image_size)) for i in range(args.num_images)]
    bodies = []
    for _ in range(args.num_prompts):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, args.max_prompt_words))) + "?"
        content = question
        if rng.random() < args.image_share:
            content = [{"type": "text", "text": question},
                       {"type": "image_url", "image_url": {"url": rng.choice(images)}}]  # fmt: skip
        bodies.append({"model": args.model, "messages": [{"role": "user", "content": content}], "stream": True,
                       "max_tokens": args.output_len, "temperature": 0.0, "ignore_eos": args.ignore_eos,
                       "stream_options": {"include_usage": True}})  # fmt: skip
    return bodies


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    start = time.perf_counter()
    result, last, chunks = Result(ok=False), None, 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    result.ok = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, ValueError) as err:
        result.error = repr(err)
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    return result


async def run(args) -> tuple[list[Result], float]:
    bodies = workload(args)
    rng = random.Random(args.seed + 1)
    limit = asyncio.Semaphore(args.max_concurrency or len(bodies))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = f"{args.base_url.rstrip('/')}/v1/chat/completions"
    bar = tqdm(total=len(bodies), desc="requests")
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), headers=headers,
                                 limits=httpx.Limits(max_connections=None)) as client:  # fmt: skip

        async def limited(body):
            async with limit:
                result = await one_request(client, url, body)
            bar.update()
            return result

        start = time.perf_counter()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(limited(body)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return results, duration


def summary(results: list[Result], duration: float, args) -> dict:
    ok = [r for r in results if r.ok]

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean": None, "p50": None, "p90": None, "p99": None}
        ordered = sorted(values)

        def pick(q):
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

        return {"mean": statistics.fmean(values) * 1e3, "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}

    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "base_url": args.base_url, "model": args.model, "num_prompts": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if not r.ok})[:5],
        "request_rate": None if args.request_rate == float("inf") else args.request_rate,
        "max_concurrency": args.max_concurrency, "image_size": args.image_size, "image_share": args.image_share,
        "duration_s": duration, "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration, "total_output_tokens": output_tokens,
        "ttft_ms": stats([r.ttft for r in ok]),
        "tpot_ms": stats([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        "itl_ms": stats([gap for r in ok for gap in r.itl]),
        "e2e_latency_ms": stats([r.e2e for r in ok]),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="cogvlm-tiny")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once"
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--image-size", type=int, default=490, choices=[490, 1344, 64], help="synthetic image side")
    parser.add_argument("--image-share", type=float, default=0.5, help="share of requests with an image")
    parser.add_argument("--num-images", type=int, default=8, help="distinct images (repeats hit the caches)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-prompt-words", type=int, default=30)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at eos (output lengths then vary)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args()
    results, duration = asyncio.run(run(args))
    report = summary(results, duration, args)
    print(f"\ncompleted {report['completed']}/{report['num_prompts']} in {duration:.2f} s: "
          f"{report['request_throughput']:.2f} req/s, {report['output_throughput']:.1f} output tokens/s")  # fmt: skip
    print(f"{'metric (ms)':<16}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        row = report[name]
        cells = "".join(
            f"{row[k]:>10.1f}" if row[k] is not None else f"{'-':>10}" for k in ("mean", "p50", "p90", "p99")
        )
        print(f"{name:<16}{cells}")
    if report["failed"]:
        print(f"failed: {report['failed']}, e.g. {report['errors'][:2]}")
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
