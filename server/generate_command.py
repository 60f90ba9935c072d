"""`cogserve generate`: one conversation through the reference generation path."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import CogVLMConfig
from model.generation import GenerationParams, generate_reference
from model.processor import Conversation, Processor, load_tokenizer
from model.weights import load_model, resolve_dtype
from server.config import GenerateConfig, ModelConfig
from server.conversation import local_image_loader, messages_to_conversation


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def load_everything(mc: ModelConfig):
    cfg = CogVLMConfig.from_checkpoint(mc.model)
    device = resolve_device(mc.device)
    processor = Processor(load_tokenizer(mc.tokenizer or mc.model), cfg)
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
    conversation = read_conversation(gc)
    model, processor = load_everything(gc.model)
    inputs = processor.build(conversation, gc.template)
    params = GenerationParams(
        max_tokens=gc.max_tokens, temperature=gc.temperature, seed=gc.seed, top_logprobs=gc.top_logprobs
    )
    result = generate_reference(model, inputs, params, gc.model.max_model_len)
    text_ids = result.output_token_ids
    if result.finish_reason == "stop":
        text_ids = text_ids[:-1]  # the stop token is not part of the text
    text = processor.decode(text_ids)
    if not gc.json:
        print(text)
        return 0
    out = {
        "prompt_token_ids": inputs.input_ids,
        "output_token_ids": result.output_token_ids,
        "text": text,
        "finish_reason": result.finish_reason,
    }
    if gc.top_logprobs:
        out["top_logprobs"] = [[[tid, lp] for tid, lp in step] for step in result.top_logprobs]
    print(json.dumps(out))
    return 0
