"""A request inside the engine: its sequence, its progress counter and how it ended."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from model.batch import SequenceData


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    seq: SequenceData
    max_tokens: int  # resolved: the request's own, capped by max_model_len
    stop_token_ids: frozenset[int]  # eos ids (unless ignore_eos) and the request's stop_token_ids
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache; prefill and decode are both "catch up"
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # queue time = first_scheduled_time - arrival_time

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def num_tokens(self) -> int:
        return self.seq.num_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
