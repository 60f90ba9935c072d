"""What Hopper's bulk tensor copy engine (TMA) needs from a call, shared by the kernels that use it.

A kernel builds its descriptors on the device (`tl.make_tensor_descriptor`); they live in a
scratch buffer Triton asks an allocator for, 128 bytes per descriptor.

NOTE: the scratch comes from torch's caching allocator, which hands the same bytes to the next
launch on the stream once this one is queued. So a kernel launched with PDL (kernels/pdl.py) must
not build a descriptor before its wait: the kernel before may still be reading its own there (an
illegal instruction on an H200, in the one-row GEMV's former TMA tiles). expert_linear, the one
user, is never launched with PDL.
"""

from __future__ import annotations

import functools

import torch
import triton


def tma_ready(t: torch.Tensor) -> bool:
    """A TMA descriptor needs a unit inner stride and a 16-byte aligned base and row stride."""
    return t.stride(-1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0


@functools.cache
def has_tma(device: torch.device) -> bool:
    """sm_90 and later; the interpreter (CPU) emulates it."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def set_tma_allocator(device: torch.device) -> None:
    """Before a launch that may build descriptors. Per thread (a ContextVar): the engine may run
    in another thread than the one that loaded the model."""
    if device.type == "cuda":
        triton.set_allocator(_scratch)
