"""Rows grouped by expert for the routed projections (kernels/expert_linear.py): where each row
goes in the routed order, computed on the device once per forward for all 6 x num_layers
projections, and the row buckets the kernel's autotuning is keyed on.

Language rows come first, then vision rows, each region starting on a multiple of ALIGN_M;
padding slots hold -1. Nothing here reads a device value on the host.

A model may also carry its hidden states in this slot order (`in_slots`) through the layers,
so that every tile of a projection is one run of rows (kernels/grouped_expert_linear.py):
`to_slots` puts rows in it and `from_slots` takes them back out, both plain gathers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Every expert region of the routed row order starts on a multiple of this, so any BLOCK_M that
# divides it never mixes experts in one tile, whichever config the autotuner picks. Smaller
# tiles leave the extra padding as empty tiles, which exit at once.
ALIGN_M = 256


@dataclass(frozen=True)
class ExpertRouting:
    """Rows grouped by expert: language rows first, then vision rows from `vision_start` on.

    Computed once per forward (the mask is the same for all 6 projections of all layers)."""

    vision_mask: torch.Tensor  # [T] bool
    sorted_rows: torch.Tensor  # [num_slots] int32: original row of each slot, -1 for padding
    vision_start: torch.Tensor  # [1] int32, on device: first slot of the vision region
    num_language: torch.Tensor  # [1] int32, on device: language rows (the stream-K tail counts tiles)
    row_slots: torch.Tensor  # [T] int32: the slot of each row (sorted_rows inverted)
    # the hidden states between the projections are in slot order (host-known, chosen by the model)
    in_slots: bool = False

    @property
    def num_slots(self) -> int:  # host-known upper bound: cdiv(T, ALIGN_M) * ALIGN_M + ALIGN_M
        return self.sorted_rows.shape[0]


def _num_slots(num_tokens: int) -> int:
    """Routed row slots for num_tokens rows: each expert's region rounded up to ALIGN_M."""
    return -(-num_tokens // ALIGN_M) * ALIGN_M + ALIGN_M  # plain ints: triton.cdiv costs microseconds a call


def tuning_bucket(num_tokens: int) -> int:
    """The row bucket (M_BUCKET) of the autotuning key for a call with num_tokens rows."""
    return 1 << (_num_slots(num_tokens) - 1).bit_length()  # the next power of two (triton.next_power_of_2)


def tuning_row_counts(max_rows: int) -> list[int]:
    """One row count per tuning bucket that calls of 1..max_rows rows fall in (the largest of each):
    a scheduler whose steps hold at most max_rows tokens makes no call outside these buckets."""
    largest = {tuning_bucket(rows): rows for rows in range(1, max_rows + 1)}  # later rows overwrite
    return sorted(largest.values())


def route_by_expert(vision_mask: torch.Tensor, in_slots: bool = False) -> ExpertRouting:
    """A few elementwise ops and one scatter; no host synchronisation."""
    num_tokens = vision_mask.shape[0]
    device = vision_mask.device
    is_vision = vision_mask.to(torch.int32)
    vision_rank = torch.cumsum(is_vision, 0, dtype=torch.int32) - 1  # rank among vision rows
    row_ids = torch.arange(num_tokens, device=device, dtype=torch.int32)
    language_rank = row_ids - vision_rank - 1  # rank among language rows
    num_language = num_tokens - is_vision.sum(dtype=torch.int32)  # device scalar
    vision_start = (num_language + ALIGN_M - 1) // ALIGN_M * ALIGN_M
    slot = torch.where(vision_mask.to(torch.bool), vision_start + vision_rank, language_rank)
    num_slots = _num_slots(num_tokens)
    sorted_rows = torch.full((num_slots,), -1, dtype=torch.int32, device=device)
    sorted_rows.scatter_(0, slot.long(), row_ids)
    return ExpertRouting(vision_mask.to(torch.bool), sorted_rows, vision_start.reshape(1), num_language.reshape(1),
                         slot, in_slots)  # fmt: skip


def to_slots(x: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:  # [T, n] -> [num_slots, n]
    """x in slot order; padding slots take a copy of row 0, so they hold finite values."""
    return x.index_select(0, routing.sorted_rows.clamp(min=0))


def from_slots(x: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:  # [num_slots, n] -> [T, n]
    """Each row read back from its slot; the padding slots are dropped. A gather: no host sync."""
    return x.index_select(0, routing.row_slots)


def slot_vision_mask(routing: ExpertRouting) -> torch.Tensor:  # [num_slots] bool
    """Which slots are in the vision region: the mask a reference runs over rows in slot order."""
    slots = torch.arange(routing.num_slots, device=routing.sorted_rows.device, dtype=torch.int32)
    return slots >= routing.vision_start
