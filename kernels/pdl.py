"""Programmatic dependent launch (PDL, sm_90+): a kernel launched this way may start while the
kernel before it in the stream drains, and must execute griddepcontrol.wait
(`tl.extra.cuda.gdc_wait()`) before it reads anything an earlier kernel wrote.

Why: a batch-1 CogVLM-17B decode step is 220 to 400 kernels in one CUDA graph, and each boundary
idles the GPU while one kernel's last blocks finish and the next one's first blocks start. With
PDL the next kernel is already resident at that point (a GEMV even loads its first weight tile).

The kernels here take `pdl` from the caller (EngineConfig.pdl, on by default: 3.87 ms against
3.96 for a 17B batch-1 step with the one-row GEMVs on an H200, RESULTS.md) and pass `PDL` to the
kernel as a constexpr, so the interpreter (no inline PTX) and GPUs before Hopper never see the
instruction. Nothing before the wait may write global memory either (kernels/tma.py says why;
tests/kernels/hopper_compile.py checks every binary).

Every kernel here triggers its dependents (`gdc_launch_dependents`) only after its own wait, so
when a kernel starts, every kernel but the one right before it has finished: what the step's
input copies wrote before the chain began (sequence lengths, block tables) may be read before
the wait. The split decode does (kernels/paged_attention.py); hopper_compile.py checks the order.
A program that exits counts as triggered: the split decode's splits without keys leave before
the wait, and the order holds because every launch has programs that wait (each sequence's
first split holds keys).
"""

from __future__ import annotations

import torch

from kernels.tma import has_tma


def pdl_launch(pdl: bool, device: torch.device) -> tuple[bool, dict]:
    """(the kernel's PDL constexpr, the launch keyword arguments) for a call on `device`."""
    on = pdl and device.type == "cuda" and has_tma(device)  # sm_90+, the same test as TMA's
    return on, ({"launch_pdl": True} if on else {})
