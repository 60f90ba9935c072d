"""`cogserve generate`: one conversation through the reference generation path."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import CogVLMConfig
from model.processor import Conversation, Processor, load_tokenizer
from model.sampling_params import SamplingParams
from model.weights import load_model, resolve_dtype
from server.config import GenerateConfig, ModelConfig
from server.conversation import local_image_loader, messages_to_conversation
from server.engine import Engine


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def load_everything(mc: ModelConfig):
    cfg = CogVLMConfig.from_checkpoint(mc.model)
    device = resolve_device(mc.device)
    processor = Processor(load_tokenizer(mc.tokenizer or mc.model, cfg.vocab_size), cfg)
    model = load_model(mc.model, resolve_dtype(mc.dtype, cfg, device), device, cfg)
    return model, processor


def read_conversation(gc: GenerateConfig) -> Conversation:
    load_image = local_image_loader(gc.model.max_image_pixels)
    if gc.messages is not None:
        try:
            messages = json.loads(Path(gc.messages).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{gc.messages}: not valid JSON ({err})") from err
        return messages_to_conversation(messages, load_image)
    return Conversation(query=gc.prompt or "", image=load_image(gc.image) if gc.image else None)


def run_generate(gc: GenerateConfig) -> int:
    """Through the engine (the reference path stays in model/generation.py as the tests' oracle)."""
    conversation = read_conversation(gc)
    model, processor = load_everything(gc.model)
    inputs = processor.build(conversation, gc.template)
    params = SamplingParams(
        temperature=gc.temperature, seed=gc.seed, max_tokens=gc.max_tokens,
        logprobs=gc.top_logprobs if gc.top_logprobs else None,
    )  # fmt: skip
    engine = Engine(model, processor, gc.engine)
    (output,) = engine.generate([(inputs, params)])[0]
    if not gc.json:
        print(output.text)
        return 0
    out = {
        "prompt_token_ids": inputs.input_ids,
        "output_token_ids": output.token_ids,
        "text": output.text,
        "finish_reason": output.finish_reason,
    }
    if gc.top_logprobs:
        out["top_logprobs"] = [[[tid, lp] for tid, lp in token.top_logprobs] for token in output.new_logprobs]
    print(json.dumps(out))
    return 0
