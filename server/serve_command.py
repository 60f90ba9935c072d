"""`cogserve serve`: load in the background (/health 503 until ready), serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import uvicorn

from model.generation_config import FILE_NAME, load_generation_defaults
from server.api import AppState, build_app
from server.async_engine import AsyncEngine
from server.config import ServeConfig
from server.engine import Engine
from server.generate_command import load_everything
from server.media import ImageFetcher
from server.metrics import Metrics

logger = logging.getLogger(__name__)


def make_state(config: ServeConfig) -> AppState:
    name = config.server.served_model_name or Path(config.model.model).name
    return AppState(config=config, served_model_name=name, metrics=Metrics(name), fetcher=ImageFetcher(config.media))


def load_engine(state: AppState) -> None:
    """The slow part (35 GB for CogVLM-17B); the server answers /health with 503 meanwhile."""
    start = time.perf_counter()
    # first: a broken generation_config.json fails the start before 35 GB of weights load
    defaults = load_generation_defaults(state.config.server.generation_config, state.config.model.model)
    if defaults.set_fields():  # vLLM says the same: a surprise otherwise
        logger.warning("sampling defaults from %s for fields a request leaves unset: %s "
                       "(--generation-config none for OpenAI's)", FILE_NAME, defaults.set_fields())  # fmt: skip
    model, processor = load_everything(state.config.model)
    engine = Engine(model, processor, state.config.engine)
    grammar_start = time.perf_counter()
    if engine.grammars.prepare():
        logger.info("structured outputs: vocabulary read in %.1f s", time.perf_counter() - grammar_start)
    else:
        logger.info("structured outputs off: the optional xgrammar package is not installed")
    async_engine = AsyncEngine(engine, state.metrics)
    async_engine.start()
    state.processor, state.max_model_len = processor, engine.max_model_len
    state.generation_defaults = defaults
    state.engine = async_engine  # last: this makes the server ready
    logger.info("model loaded in %.1f s; serving %s", time.perf_counter() - start, state.served_model_name)


class DrainingServer(uvicorn.Server):
    """SIGTERM / SIGINT: /health and new requests get 503, in-flight requests finish (up to the
    shutdown timeout), then the server exits with status 0."""

    def __init__(self, config: uvicorn.Config, state: AppState):
        super().__init__(config)
        self.state = state

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # NOTE: not uvicorn's handler: that one stops at once and re-raises the signal after
        # shutdown, which would end the process with the signal's status instead of 0.
        if self.state.draining:
            self.should_exit = True  # a second signal: stop now
            return
        self.state.draining = True
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.drain()))

    async def drain(self) -> None:
        deadline = time.monotonic() + self.state.config.server.shutdown_timeout_s
        engine = self.state.engine
        logger.info("draining: %d requests in flight", engine.num_in_flight if engine else 0)
        while engine is not None and engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def run_serve(config: ServeConfig) -> int:
    state = make_state(config)
    app = build_app(state)
    server = DrainingServer(uvicorn.Config(app, host=config.server.host, port=config.server.port,
                                           log_level="info", timeout_graceful_shutdown=5), state)  # fmt: skip
    failed = threading.Event()

    def load() -> None:
        try:
            load_engine(state)
        except Exception as err:  # noqa: BLE001 -- logged; the server then exits 1
            if isinstance(err, ValueError | OSError):  # a checkpoint or flag problem: the message names it
                logger.error("cannot serve: %s", err)
            else:
                logger.exception("loading the model failed")
            failed.set()
            server.should_exit = True

    threading.Thread(target=load, name="cogserve-loader", daemon=True).start()
    server.run()
    if state.engine is not None:
        state.engine.stop()
    return 1 if failed.is_set() else 0
