"""Where a Triton kernel replaces plain torch: on CUDA, always; on CPU only when a test forces
it (the kernels then run in the Triton interpreter). The torch versions are the CPU path and
each kernel's reference, and the path whenever autograd needs a graph (the kernels have no
backward: training on CUDA must not silently stop gradients)."""

from __future__ import annotations

import torch

# Tests flip this to run the Triton kernels under the interpreter on CPU.
FORCE_TRITON = False


def use_triton(x: torch.Tensor) -> bool:
    return (x.is_cuda or FORCE_TRITON) and not (x.requires_grad and torch.is_grad_enabled())
