"""The bridge between the event loop and the engine.

The engine steps on its own thread (a step is seconds of blocking GPU or CPU work the event loop
must never wait on). Requests and aborts reach it through a thread-safe queue; outputs come back
to each request's asyncio.Queue through call_soon_threadsafe. A stream that is closed early
(client gone, timeout) aborts its request, which frees its KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from model.processor import PromptInputs
from model.sampling_params import SamplingParams
from server.engine import Engine, RequestOutput
from server.metrics import Metrics

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed; every open stream receives this."""


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: Metrics | None = None):
        self.engine = engine
        self.metrics = metrics
        self.commands: queue.Queue = queue.Queue()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # NOTE: two counters, each written by one thread only (a shared += could lose updates)
        self.num_added = 0  # by the event loop
        self.num_taken = 0  # by the engine thread
        self.dead: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cogserve-engine", daemon=True)
        self._last_prefix = (0, 0)
        self._last_encoder_hits = 0
        self._last_preemptions = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.commands.put(("wake",))
        self._thread.join(timeout=10)

    @property
    def grammars(self):
        """The engine's structured-output compiler: thread-safe, so the HTTP handlers compile ahead."""
        return self.engine.grammars

    @property
    def num_waiting(self) -> int:
        return self.engine.scheduler.num_waiting + self.num_added - self.num_taken

    @property
    def num_in_flight(self) -> int:
        return len(self.streams)

    async def generate(
        self, request_id: str, prompt: PromptInputs, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Every RequestOutput of the request's n completions, until all n finished."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        stream: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = (asyncio.get_running_loop(), stream)
        self.num_added += 1
        self.commands.put(("add", request_id, prompt, params))
        num_finished = 0
        try:
            while num_finished < params.n:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                num_finished += item.finished
                yield item
        finally:
            self.streams.pop(request_id, None)
            if num_finished < params.n:
                self.commands.put(("abort", request_id))

    def _deliver(self, request_id: str, item) -> None:
        target = self.streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                took_commands = self._drain_commands(block=not self.engine.has_unfinished)
                if self.engine.has_unfinished:
                    for output in self.engine.step():
                        self._deliver(output.request_id, output)
                    self._record_step()
                elif took_commands:  # the last requests were aborted: no step will refresh the gauges
                    self._record_step()
        except BaseException as err:  # noqa: BLE001 -- every stream must hear of it, then the thread ends
            logger.exception("engine thread failed")
            self.dead = err
            for request_id in list(self.streams):
                self._deliver(request_id, EngineDeadError(f"the engine stopped: {err}"))

    def _drain_commands(self, block: bool) -> bool:
        """Adds and aborts from the event loop; whether there were any."""
        try:
            command = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            if command[0] == "add":
                _, request_id, prompt, params = command
                self.num_taken += 1
                try:
                    self.engine.add_request(request_id, prompt, params)
                except ValueError as err:  # a bad request: a 400
                    self._deliver(request_id, err)
                except Exception as err:  # noqa: BLE001 -- one request's failure must not stop the others
                    logger.exception("adding request %s failed", request_id)
                    self.engine.abort(request_id)  # whatever part of it got in
                    self._deliver(request_id, err)
            elif command[0] == "abort":
                self.engine.abort(command[1])
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return True

    def _record_step(self) -> None:
        m = self.metrics
        if m is None:
            return
        engine, kv, runner = self.engine, self.engine.kv, self.engine.runner
        m.num_requests_running.set(engine.scheduler.num_running)
        m.num_requests_waiting.set(self.num_waiting)
        m.kv_cache_usage_perc.set(kv.usage)
        queries, hits = kv.num_prefix_queries, kv.num_prefix_hits
        m.prefix_cache_queries.inc(queries - self._last_prefix[0])
        m.prefix_cache_hits.inc(hits - self._last_prefix[1])
        self._last_prefix = (queries, hits)
        m.encoder_cache_hits.inc(runner.num_encoder_cache_hits - self._last_encoder_hits)
        self._last_encoder_hits = runner.num_encoder_cache_hits
        m.num_preemptions.inc(engine.scheduler.num_preemptions - self._last_preemptions)
        self._last_preemptions = engine.scheduler.num_preemptions
        for seconds in runner.drain_encode_seconds():
            m.vision_encode.observe(seconds)
