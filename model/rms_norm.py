from __future__ import annotations

import torch
from torch import nn

from kernels.rms_norm import rms_norm, rms_norm_ref
from model.dispatch import use_triton


class RMSNorm(nn.Module):
    """CogVLM's RMSNorm: the weight multiplies in fp32 *before* the cast back (COGVLM.md 4.3).
    Casting first (as Llama's HF code does) changes bf16 results in the last bit.

    With a residual, the residual add comes first and both results return, fused into one
    kernel on CUDA: norm(x, residual) -> (normed(x + residual), x + residual)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        normed, summed = (rms_norm if use_triton(x) else rms_norm_ref)(x, self.weight, self.eps, residual)
        return normed if residual is None else (normed, summed)
