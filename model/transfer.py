"""Host lists to the device without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory and then synchronises the
stream, so it waits for every kernel already queued: in a look-ahead step (server/engine.py)
that is the whole previous step, and the host stops overlapping the device. A copy from a CPU
tensor with non_blocking=True is staged by the driver and queued in order instead.
"""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
