"""Shared setup for engine tests: a tiny model, prompts of mixed kinds, and the reference tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from model.config import CogVLMConfig
from model.generation import GenerationParams, generate_reference
from model.processor import Conversation, Processor, PromptInputs, load_tokenizer
from model.sampling_params import SamplingParams
from model.weights import load_model
from server.engine import Engine, EngineConfig

MAX_TOKENS = 6  # what the engine tests generate per request
QUESTIONS = ["What is in the image?", "Where is the red circle?", "Describe the picture.", "Hi", "Colour?"]


@dataclass
class Setup:
    model: object
    processor: Processor
    images: list[Image.Image]

    def engine(self, **config) -> Engine:
        return Engine(self.model, self.processor, engine_config(self.model, **config))

    def prompts(self, count: int) -> list[PromptInputs]:
        """Mixed: every other request has one of 3 images (so some share one), lengths vary."""
        out = []
        for i in range(count):
            image = self.images[i % 3] if i % 2 == 0 else None
            history = (("Hi", "Hello"),) if i % 5 == 4 else ()
            query = " ".join(QUESTIONS[(i + j) % len(QUESTIONS)] for j in range(1 + i % 3))
            out.append(self.processor.build(Conversation(query=query, history=history, image=image)))
        return out

    def reference(self, prompt: PromptInputs, max_tokens: int) -> list[int]:
        return generate_reference(self.model, prompt, GenerationParams(max_tokens=max_tokens)).output_token_ids


def engine_config(model, **config) -> EngineConfig:
    """The tests' engine settings: `config` over a 512-block pool, with max_model_len what that pool
    holds (small pools force preemption; the engine refuses a max_model_len its pool cannot hold)."""
    config.setdefault("num_kv_blocks", 512)  # 8192 tokens: plenty, and quick to allocate
    pool_tokens = config["num_kv_blocks"] * config.get("block_size", EngineConfig.block_size)
    config.setdefault("max_model_len", min(pool_tokens, model.config.max_position_embeddings))
    return EngineConfig(**config)


def make_setup(folder) -> Setup:
    cfg = CogVLMConfig.from_checkpoint(folder)
    generator = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(24, 36, 3, generator=generator) * 255).byte().numpy()) for _ in range(3)]
    return Setup(load_model(folder, torch.float32), Processor(load_tokenizer(folder), cfg), images)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)
