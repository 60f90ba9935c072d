"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

There is no prefill or decode phase: every request has num_computed_tokens catching up with its
token count. Each step, under a token budget: running requests first, in arrival order (a decode
needs one token, an unfinished prefill the rest of its prompt or what the budget leaves), then
waiting requests in FCFS order, each starting from its longest cached prefix. A chunk may end
anywhere, inside an image too. When blocks run out, the newest running request is preempted:
its blocks are freed and it starts over (its generated tokens kept) at the head of the queue.
The scheduler never touches tensors.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from model.batch import RunnerOutput, SampledToken, ScheduledSequence, SchedulerOutput
from server.kv_blocks import KVCacheManager
from server.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # running requests at most
    max_num_batched_tokens: int = 2048  # tokens per step: prefill chunks share it with decodes
    max_model_len: int = 2048  # prompt + output tokens of one request


@dataclass
class TokenEvent:
    """One request's progress in a step: a new token, and how it ended if it did."""

    request: Request
    token: SampledToken | None
    finish_reason: str | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.finished_ids: list[str] = []  # since the last schedule(): the runner drops their state
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def schedule(self, ahead: bool = False) -> SchedulerOutput | None:
        """ahead: plan the step while the step in flight has not reported its tokens. A running
        request whose tokens are all computed then has one more, the token that step sampled
        (counted, not yet known: the runner and the sampler read it on the device); if that
        token is certainly its last, the request sits the step out. Returns None where the step
        would preempt (a preempted request recomputes from its real tokens) or run nothing."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            in_flight = ahead and request.num_computed_tokens == request.num_tokens
            if in_flight and self._last_token(request):
                index += 1
                continue
            num_new = min(request.num_tokens + in_flight - request.num_computed_tokens, budget)
            while not self.kv.allocate(request.seq, request.num_computed_tokens + num_new):
                if ahead:
                    return None  # NOTE: blocks taken for the requests before stay theirs: no leak
                victim = self.running.pop()  # newest first
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                index += 1
        # NOTE: no new admissions in a step that had to preempt: the pool is full.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            # prompt_logprobs need every prompt position computed: no prefix-cache hits (as vLLM)
            hits = self.kv.computed_blocks(request.seq) if request.seq.params.prompt_logprobs is None else []
            num_cached = len(hits) * self.kv.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate(request.seq, num_cached + num_new, hits):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        if ahead and not scheduled:
            return None  # NOTE: before finished_ids are handed out: the step that runs passes them on
        out = SchedulerOutput(scheduled=scheduled, finished_request_ids=self.finished_ids)
        self.finished_ids = []
        return out

    def _last_token(self, request: Request) -> bool:
        """The token in flight ends the request whatever its value (see _stop_reason)."""
        return len(request.output_token_ids) + 1 >= request.max_tokens or \
            request.num_tokens + 1 >= self.config.max_model_len  # fmt: skip

    def launched(self, out: SchedulerOutput) -> None:
        """The step is queued on the device: its tokens count as computed from now on."""
        for s in out.scheduled:
            request = self.requests.get(s.seq.request_id)
            if request is not None and request.status is RequestStatus.RUNNING:
                request.num_computed_tokens = max(request.num_computed_tokens, s.end)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledSequence:
        start = request.num_computed_tokens
        return ScheduledSequence(request.seq, start, start + num_new, self.kv.block_ids(request.request_id))

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[TokenEvent]:
        """The step's tokens (waiting for them if they are still on the device)."""
        result.resolve()
        events = []
        for s in out.scheduled:
            request = self.requests.get(s.seq.request_id)
            if request is None or request.is_finished or request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens = max(request.num_computed_tokens, s.end)  # launched() may have run
            token = result.sampled.get(request.request_id)
            if token is not None:
                request.output_token_ids.append(token.token_id)
            # NOTE: a look-ahead step may have computed past the known tokens: key known ones only
            self.kv.cache_computed(request.seq, min(request.num_computed_tokens, request.num_tokens))
            if token is None:
                continue  # a prefill chunk that did not reach the end of the prompt
            reason = self._stop_reason(request, token.token_id)
            if reason is not None:
                self.finish(request.request_id, reason)
            events.append(TokenEvent(request, token, reason))
        return events

    def _stop_reason(self, request: Request, token_id: int) -> str | None:
        if token_id in request.stop_token_ids:
            return "stop"
        if len(request.output_token_ids) >= request.max_tokens:
            return "length"
        if request.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def finish(self, request_id: str, reason: str) -> Request | None:
        """Finish or abort: frees every block at once. Unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.kv.free(request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.finished_ids.append(request_id)
        return request

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
