"""Evaluate the embedded model on a held-out set (a seed training never draws from), through the
real HTTP server with the `openai` client and through the reference generation path; report
caption exact match, VQA accuracy and grounding accuracy (IoU >= 0.5), and check that the two
paths agree answer for answer.

    python -m training.evaluate --model models/cogvlm-tiny-shapes --per-task 100 [--json eval.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from model.config import CogVLMConfig
from model.generation import GenerationParams, generate_reference
from model.processor import Conversation, Processor, load_tokenizer
from model.weights import load_model
from training.shapes_dataset import Sample, iou, parse_box, samples

HELD_OUT_SEED = 10_000_019  # training draws from random.Random(TrainConfig.seed): a different stream
TASKS = ("caption", "vqa", "grounding")
MAX_TOKENS = 32


def held_out(per_task: int) -> list[Sample]:
    return [s for i, task in enumerate(TASKS) for s in samples(HELD_OUT_SEED + i, per_task, task)]


def is_correct(sample: Sample, answer: str) -> bool:
    if sample.task == "grounding":
        predicted, truth = parse_box(answer), parse_box(sample.answer)
        return predicted is not None and iou(predicted, truth) >= 0.5
    return answer.strip() == sample.answer


def scores(items: list[Sample], answers: list[str]) -> dict[str, float]:
    out = {}
    for task in TASKS:
        pairs = [(s, a) for s, a in zip(items, answers, strict=True) if s.task == task]
        out[task] = sum(is_correct(s, a) for s, a in pairs) / max(1, len(pairs))
    return out


QUESTION_KINDS = {"How many": "count", "What color": "colour", "What shape": "shape", "left or right": "left/right",
                  "above or below": "above/below"}  # fmt: skip


def kind_of(sample: Sample) -> str:
    """What a sample tests, finer than its task: the question's kind, or how many shapes there are."""
    if sample.task == "vqa":
        return "vqa " + next(kind for words, kind in QUESTION_KINDS.items() if words in sample.question)
    return f"{sample.task} {len(sample.shapes)} shape{'s' if len(sample.shapes) > 1 else ''}"


def breakdown(items: list[Sample], answers: list[str]) -> dict[str, tuple[int, int]]:
    """{kind: (correct, total)}, sorted by kind."""
    out: dict[str, tuple[int, int]] = {}
    for sample, answer in zip(items, answers, strict=True):
        kind = kind_of(sample)
        correct, total = out.get(kind, (0, 0))
        out[kind] = (correct + is_correct(sample, answer), total + 1)
    return dict(sorted(out.items()))


def png_data_uri(sample: Sample) -> str:
    buffer = io.BytesIO()
    sample.image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask_server(client, model_name: str, sample: Sample) -> str:
    content = [
        {"type": "text", "text": sample.question},
        {"type": "image_url", "image_url": {"url": png_data_uri(sample)}},
    ]
    response = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": content}],
                                              max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body={"template": sample.template})  # fmt: skip
    return response.choices[0].message.content


def ask_reference(model, processor: Processor, sample: Sample) -> str:
    inputs = processor.build(Conversation(query=sample.question, image=sample.image), sample.template)
    tokens = generate_reference(model, inputs, GenerationParams(max_tokens=MAX_TOKENS)).output_token_ids
    if tokens and tokens[-1] in model.config.eos_token_ids:
        tokens = tokens[:-1]
    return processor.decode(tokens)


def evaluate_reference(model_dir: str, per_task: int) -> dict[str, float]:
    """Scores of the checkpoint in model_dir on the held-out set through the reference path alone
    (fp32 on CPU, as `main` checks the server against)."""
    items = held_out(per_task)
    model = load_model(model_dir, torch.float32)
    processor = Processor(load_tokenizer(model_dir), CogVLMConfig.from_checkpoint(model_dir))
    return scores(items, [ask_reference(model, processor, s) for s in items])


def start_server(model_dir: str, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", "from server.cli import main; raise SystemExit(main())", "serve",
                                "--model", model_dir, "--port", str(port), "--served-model-name", "eval"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not become healthy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/cogvlm-tiny-shapes")
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    items = held_out(args.per_task)
    server = start_server(args.model, args.port)
    try:
        import openai  # not on the GPU machine, where evaluate_reference runs after training

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused", max_retries=0)
        served = [ask_server(client, "eval", s) for s in items]
    finally:
        server.terminate()
        server.wait(30)
    model = load_model(args.model, torch.float32)
    processor = Processor(load_tokenizer(args.model), CogVLMConfig.from_checkpoint(args.model))
    reference = [ask_reference(model, processor, s) for s in items]
    agree = sum(a == b for a, b in zip(served, reference, strict=True))
    report = {"held_out_seed": HELD_OUT_SEED, "per_task": args.per_task, "server": scores(items, served),
              "reference": scores(items, reference), "agreement": agree / len(items),
              "server_by_kind": breakdown(items, served)}  # fmt: skip
    print(f"held-out set: {args.per_task} samples per task (seed {HELD_OUT_SEED})")
    for task in TASKS:
        print(f"  {task:<10} server {report['server'][task]:6.1%}   reference {report['reference'][task]:6.1%}")
    print(f"  server and reference answers agree on {agree}/{len(items)}")
    print("  through the server, by kind: " + ", ".join(f"{kind} {c}/{n}" for kind, (c, n) in
                                                         report["server_by_kind"].items()))  # fmt: skip
    misses = [(s.question, s.answer, a) for s, a in zip(items, served, strict=True) if not is_correct(s, a)][:8]
    for question, truth, answer in misses:
        print(f"  miss: {question!r} -> {answer!r} (want {truth!r})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
