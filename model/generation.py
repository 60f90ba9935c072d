"""The reference generation path: one sequence, contiguous KV cache, greedy or sampled.

Small and obviously right on purpose: it is the oracle the paged, batched engine is tested
against, token for token in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.attention import ContiguousKVCache
from model.cogvlm import CogVLMForCausalLM
from model.processor import PromptInputs, vision_expert_mask

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    seed: int | None = None  # sampling generator seed; None: nondeterministic
    top_logprobs: int = 0  # K best [token_id, logprob] per generated token
    stop_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's eos ids

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")


@dataclass
class GenerationResult:
    output_token_ids: list[int]  # includes the stop token when finish_reason is "stop"
    finish_reason: str  # "stop" or "length"
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@torch.inference_mode()
def generate_reference(
    model: CogVLMForCausalLM, inputs: PromptInputs, params: GenerationParams, max_model_len: int | None = None
) -> GenerationResult:
    params.validate()
    cfg, device = model.config, model.device
    max_model_len = max_model_len or cfg.max_position_embeddings
    if max_model_len > cfg.max_position_embeddings:  # rotary's table has that many positions
        raise ValueError(f"max_model_len {max_model_len} exceeds the checkpoint's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")  # fmt: skip
    prompt_len = inputs.num_tokens
    if prompt_len >= max_model_len:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room in max_model_len {max_model_len}")
    max_tokens = min(params.max_tokens, max_model_len - prompt_len)
    stop_ids = set(cfg.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids)
    generator = None
    if params.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed) if params.seed is not None else generator.seed()

    input_ids = torch.tensor(inputs.input_ids, device=device)
    image_embeds = slot_ids = None
    if inputs.pixels is not None:
        image_embeds = model.encode_images(inputs.pixels[None].to(device))[0]  # [N_img, hidden]
        slot_ids = torch.tensor(inputs.image_slots, device=device)
    mask = vision_expert_mask(inputs.token_type_ids)
    vision_mask = torch.tensor(mask, device=device) if any(mask) else None
    cache = ContiguousKVCache(
        cfg.num_layers, prompt_len + max_tokens, cfg.num_kv_heads, cfg.head_dim, model.dtype, device
    )

    embeds = model.embed(input_ids, image_embeds, slot_ids)
    positions = torch.tensor(inputs.position_ids, device=device)
    result = GenerationResult(output_token_ids=[], finish_reason="length")
    for _ in range(max_tokens):
        hidden = model(embeds, positions, vision_mask, cache)
        cache.advance(embeds.shape[0])
        logits = model.compute_logits(hidden[-1:])[0]  # [vocab] fp32
        token = sample(logits, params.temperature, generator)
        result.output_token_ids.append(token)
        if params.top_logprobs:
            top = torch.log_softmax(logits, dim=-1).topk(params.top_logprobs)
            result.top_logprobs.append(list(zip(top.indices.tolist(), top.values.tolist(), strict=True)))
        if token in stop_ids:
            result.finish_reason = "stop"
            break
        # Decode tokens are text: language expert, next rotary position.
        embeds = model.embed(torch.tensor([token], device=device))
        positions = positions[-1:] + 1
        vision_mask = None
    return result


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
