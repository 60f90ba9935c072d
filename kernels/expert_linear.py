"""Routed visual-expert projection: every row goes through one of two weight sets.

out[i] = x[i] @ w_vision.T + b_vision    if vision_mask[i]
out[i] = x[i] @ w_language.T + b_language otherwise
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_linear_ref(
    x: torch.Tensor,  # [num_tokens, in]
    vision_mask: torch.Tensor,  # [num_tokens] bool
    w_language: torch.Tensor,  # [out, in]
    w_vision: torch.Tensor,  # [out, in]
    b_language: torch.Tensor | None = None,  # [out]
    b_vision: torch.Tensor | None = None,  # [out]
) -> torch.Tensor:  # [num_tokens, out]
    """Gather -> two GEMMs -> scatter, as the reference code does. Syncs with the host
    (boolean indexing); it is the oracle and the CPU path, not the GPU path."""
    out = x.new_empty(x.shape[0], w_language.shape[0])
    vision_mask = vision_mask.to(torch.bool)
    language_mask = ~vision_mask
    out[vision_mask] = F.linear(x[vision_mask], w_vision, b_vision)
    out[language_mask] = F.linear(x[language_mask], w_language, b_language)
    return out


def expert_linear(
    x: torch.Tensor,  # [num_tokens, in]
    vision_mask: torch.Tensor | None,  # [num_tokens] bool; None: the batch has no vision token
    w_language: torch.Tensor,  # [out, in]
    w_vision: torch.Tensor,  # [out, in]
    b_language: torch.Tensor | None = None,
    b_vision: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, out]
    """Dispatcher the model calls. `vision_mask is None` is host-side knowledge (from the
    scheduler's metadata) that every row is text, e.g. every decode step: one dense GEMM."""
    if vision_mask is None:
        return F.linear(x, w_language, b_language)
    return expert_linear_ref(x, vision_mask, w_language, w_vision, b_language, b_vision)
