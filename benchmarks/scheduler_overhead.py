"""Scheduler + block bookkeeping cost per decode step, with a fake runner (no model):
256 running requests, one token each per step. Target: under 1 ms on CPU.

    python benchmarks/scheduler_overhead.py [--requests 256] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

from model.batch import RunnerOutput, SampledToken, SequenceData
from model.processor import PromptInputs, position_ids_for
from model.sampling_params import SamplingParams
from server.kv_blocks import KVCacheManager
from server.request import Request
from server.scheduler import Scheduler, SchedulerConfig


def request(i: int, prompt_len: int, max_tokens: int) -> Request:
    types = [0] + [1] * 66 + [0] * (prompt_len - 67)  # an image, as the tiny model's
    ids = [1] + [0] * 66 + [(i * 31 + j) % 500 + 3 for j in range(prompt_len - 67)]
    prompt = PromptInputs(ids, types, position_ids_for(types), None, list(range(1, 67)), f"image-{i % 8}")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return Request(SequenceData(f"r{i}", prompt, params), max_tokens, frozenset({2}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    kv = KVCacheManager(num_blocks=args.requests * 32, block_size=16)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=args.requests, max_num_batched_tokens=8192,
                                          max_model_len=4096), kv)  # fmt: skip
    for i in range(args.requests):
        scheduler.add(request(i, 100, max_tokens=10_000))
    while scheduler.waiting or any(r.num_computed_tokens < r.seq.num_prompt_tokens for r in scheduler.running):
        out = scheduler.schedule()
        scheduler.update(out, RunnerOutput({s.seq.request_id: SampledToken(7) for s in out.scheduled
                                            if s.needs_sample}))  # fmt: skip
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        out = scheduler.schedule()
        result = RunnerOutput({s.seq.request_id: SampledToken(7) for s in out.scheduled})  # the fake runner
        scheduler.update(out, result)
        times.append(time.perf_counter() - start)
    assert len(out.scheduled) == args.requests
    ms = sorted(t * 1e3 for t in times)
    print(f"{args.requests} running requests, {args.steps} decode steps: schedule + update per step "
          f"median {statistics.median(ms):.3f} ms, p90 {ms[int(0.9 * len(ms))]:.3f} ms (target < 1 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
