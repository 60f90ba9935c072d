from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """CogVLM's RMSNorm: the weight multiplies in fp32 *before* the cast back (COGVLM.md 4.3).
    Casting first (as Llama's HF code does) changes bf16 results in the last bit."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)
