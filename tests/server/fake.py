"""Scheduler test helpers: sequences without a model, and a runner that samples by rule."""

from __future__ import annotations

from model.batch import RunnerOutput, SampledToken, SchedulerOutput, SequenceData
from model.processor import PromptInputs, position_ids_for
from model.sampling_params import SamplingParams
from server.request import Request


def make_request(
    request_id: str,
    num_prompt: int,
    max_tokens: int = 4,
    image_at: int | None = None,
    image_len: int = 0,
    image_hash: str = "img",
    first_token: int = 5,
) -> Request:
    types = [0] * num_prompt
    slots = []
    if image_at is not None:
        slots = list(range(image_at, image_at + image_len))
        for i in slots:
            types[i] = 1
    ids = [first_token + (i % 7) if types[i] == 0 else 0 for i in range(num_prompt)]
    prompt = PromptInputs(ids, types, position_ids_for(types), None, slots, image_hash if slots else None)
    seq = SequenceData(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return Request(seq, max_tokens, frozenset({2}))


class FakeRunner:
    """Samples token 3 for every sequence that reached its end, or with stop_every = k the stop
    id 2 at every k-th position; records what it saw."""

    def __init__(self, stop_every: int = 0):
        self.steps: list[SchedulerOutput] = []
        self.stop_every = stop_every

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.steps.append(out)
        return RunnerOutput({s.seq.request_id: SampledToken(self._token(s.end)) for s in out.scheduled
                             if s.needs_sample})  # fmt: skip

    def _token(self, position: int) -> int:
        return 2 if self.stop_every and position % self.stop_every == 0 else 3
