"""Host lists to the device, and device results back, without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory and then synchronises the
stream, so it waits for every kernel already queued: in a look-ahead step (server/engine.py)
that is the whole previous step, and the host stops overlapping the device. A copy from a CPU
tensor with non_blocking=True is staged by the driver and queued in order instead. Back the
other way, a plain `.tolist()` waits for everything queued too, the next step included:
`to_host_later` queues pinned copies and waits for them alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def to_host_later(tensors: list[torch.Tensor | None]) -> Callable[[], list[torch.Tensor | None]]:
    """Queue pinned host copies of device tensors; the returned call waits for them alone and gives
    them back. On CPU: the tensors themselves."""
    if not any(t is not None and t.is_cuda for t in tensors):
        return lambda: tensors
    host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for t in tensors]  # fmt: skip
    ready = torch.cuda.Event()
    ready.record()

    def wait() -> list[torch.Tensor | None]:
        ready.synchronize()
        return host

    return wait
