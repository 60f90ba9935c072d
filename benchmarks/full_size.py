"""The full-size CogVLM architectures with random bf16 weights that the GPU benchmarks run
(no checkpoint can be downloaded here), and a tokenizer that needs no vocabulary file."""

from __future__ import annotations

import dataclasses

import torch

from model.cogvlm import CogVLMForCausalLM
from model.config import CogVLMConfig, cogvlm2_19b_config, cogvlm_17b_config
from model.tiny_checkpoint import tiny_config

ARCHITECTURES = {
    "cogvlm-17b": cogvlm_17b_config,
    "cogvlm2-19b": cogvlm2_19b_config,
    # CPU smoke tests of the benchmark scripts
    "tiny": lambda: tiny_config(1, vocab_size=1200),
    "tiny2": lambda: tiny_config(2, vocab_size=1200),  # CogVLM2's layout: GQA, the 2x2 conv, vision QKV bias
}


class DigitTokenizer:
    """Prompts need token ids only: one id per character (100..1099); decode renders ids as digits."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [100 + ord(c) % 1000 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)


def random_model(
    arch: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, num_layers: int | None = None
) -> CogVLMForCausalLM:
    """Built on the meta device, then materialised once on `device`: a 35 GB model never exists
    twice. num_layers: fewer decoder layers than the architecture's (a layer benchmark)."""
    cfg: CogVLMConfig = ARCHITECTURES[arch]()
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    torch.set_default_dtype(dtype)
    with torch.device("meta"):
        model = CogVLMForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    return model.eval()
