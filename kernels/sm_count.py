"""How many SMs a device has: the program count of the persistent kernels (expert_linear's
stream-K launch, the one-row GEMV's persistent configs)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 6  # the interpreter: few programs, so small test shapes already leave a partial wave
