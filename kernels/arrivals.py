"""Arrival counts for kernels where the last program to finish a piece of work merges the
others' parts (the split decode in paged_attention.py, the stream-K tail in expert_linear.py).

The pattern, in the kernel: every thread stores its part; `tl.debug_barrier()` orders those
stores before the count; one acq_rel atomic add at GPU scope counts the program in; the program
that sees the last count loads the parts with `.cg` (from L2: they were written on other SMs),
merges them in a fixed order (same bits whichever program is last), and zeroes the count again
for the next launch. Nothing waits, so programs need not be resident together.
(tests/kernels/hopper_compile.py checks each such binary puts a barrier before its count.)
"""

from __future__ import annotations

import torch

_COUNTS: dict[tuple[torch.device, int], torch.Tensor] = {}


def arrival_counts(device: torch.device, count: int) -> torch.Tensor:
    """`count` int32 zeros on `device`, the same buffer for every launch that asks (the kernels
    leave them zero). Allocated on first use, which must not be inside a CUDA graph capture: the
    buffer would live in that graph's private memory pool."""
    counts = _COUNTS.get((device, count))
    if counts is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("arrival counts are allocated on first use: run the kernel once before capturing "
                               "a CUDA graph (the decode graphs' warm-up does)")  # fmt: skip
        counts = _COUNTS[(device, count)] = torch.zeros(count, dtype=torch.int32, device=device)
    return counts
