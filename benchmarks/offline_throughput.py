"""Offline throughput: N concurrent requests through the engine against the same requests one
after another through the reference path (contiguous KV cache, one sequence), in one run.
Greedy, every request generates exactly --max-tokens tokens (ignore_eos), so both sides do the
same work. Target on CPU with the tiny model: >= 6x the reference's output tokens/s at 32.

    python benchmarks/offline_throughput.py [--model DIR] [--num-requests 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from PIL import Image
from tqdm import tqdm

from model.config import CogVLMConfig
from model.generation import GenerationParams, generate_reference
from model.processor import Conversation, Processor, load_tokenizer
from model.sampling_params import SamplingParams
from model.tiny_checkpoint import write_tiny_checkpoint
from model.weights import load_model
from server.engine import Engine, EngineConfig

QUESTIONS = ["What is in the image?", "Where is the red circle?", "Describe the picture in detail.", "Colour?"]


def build_prompts(processor: Processor, count: int):
    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(64, 64, 3, generator=generator) * 255).byte().numpy()) for _ in range(4)]
    # half image requests (4 distinct images), half text-only, mixed lengths
    return [
        processor.build(Conversation(query=QUESTIONS[i % 4] * (1 + i % 3), image=images[i % 4] if i % 2 else None))
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a fresh tiny generation-1 model)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the best of each side is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or write_tiny_checkpoint(tmp, 1) and tmp
        cfg = CogVLMConfig.from_checkpoint(folder)
        model = load_model(folder, torch.float32)
        processor = Processor(load_tokenizer(folder), cfg)
    prompts = build_prompts(processor, args.num_requests)
    n_out = args.num_requests * args.max_tokens

    engine = Engine(model, processor, EngineConfig(num_kv_blocks=4096))
    engine.generate([(prompts[0], SamplingParams(temperature=0, max_tokens=2))])  # warm up
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    reference = GenerationParams(max_tokens=args.max_tokens, stop_token_ids=())
    engine_s = reference_s = float("inf")
    for _ in tqdm(range(args.repeats), desc="rounds"):  # best of N for both sides: the machine is shared
        engine = Engine(model, processor, EngineConfig(num_kv_blocks=4096))  # cold prefix cache every round
        start = time.perf_counter()
        outputs = engine.generate([(p, params) for p in prompts])
        engine_s = min(engine_s, time.perf_counter() - start)
        start = time.perf_counter()
        reference_tokens = [generate_reference(model, p, reference).output_token_ids for p in prompts]
        reference_s = min(reference_s, time.perf_counter() - start)
    assert sum(len(o[0].token_ids) for o in outputs) == n_out
    same = sum(o[0].token_ids == r for o, r in zip(outputs, reference_tokens, strict=True))

    print(f"{args.num_requests} requests x {args.max_tokens} tokens, torch threads {args.threads}, "
          f"best of {args.repeats}")  # fmt: skip
    print(f"reference, one at a time: {reference_s:7.2f} s  {n_out / reference_s:8.1f} output tokens/s")
    print(f"engine, all at once:      {engine_s:7.2f} s  {n_out / engine_s:8.1f} output tokens/s")
    print(f"speedup {reference_s / engine_s:.2f}x (target >= 6x); identical greedy outputs: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
