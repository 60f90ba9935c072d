"""A real cogserve app on loopback, in a thread, over an engine loaded once; and a tiny image host."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import uvicorn
from PIL import Image

from server.api import AppState, build_app
from server.async_engine import AsyncEngine
from server.config import ServeConfig
from server.media import ImageFetcher
from server.metrics import Metrics

MODEL_NAME = "cogvlm-tiny"


@contextlib.contextmanager
def running_engine(folder, num_kv_blocks: int = 512, async_scheduling: bool | None = None):
    """(model, processor, AsyncEngine) over a checkpoint in fp32, its thread stopped on exit."""
    import torch

    from model.config import CogVLMConfig
    from model.processor import Processor, load_tokenizer
    from model.weights import load_model
    from server.engine import Engine, EngineConfig

    processor = Processor(load_tokenizer(folder), CogVLMConfig.from_checkpoint(folder))
    model = load_model(folder, torch.float32)
    config = EngineConfig(num_kv_blocks=num_kv_blocks, async_scheduling=async_scheduling)
    engine = AsyncEngine(Engine(model, processor, config))
    engine.start()
    try:
        yield model, processor, engine
    finally:
        engine.stop()


def wait_until(done, seconds: float = 30.0) -> bool:
    """Poll done() every 20 ms until it holds or `seconds` pass; returns its last answer. A guard
    against hangs, not a timing: `make test` runs two workers, so a step may take many times
    its idle time (the aborts these tests wait for land within a step or two)."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, state: AppState):
        self.app, self.state = app, state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def make_state(config: ServeConfig, engine: AsyncEngine, processor) -> AppState:
    state = AppState(
        config=config, served_model_name=MODEL_NAME, metrics=Metrics(MODEL_NAME), fetcher=ImageFetcher(config.media)
    )
    state.engine, state.processor, state.max_model_len = engine, processor, engine.engine.max_model_len
    engine.metrics = state.metrics  # as serve_command wires it: the engine thread sets the gauges
    return state


def serve(config: ServeConfig, engine: AsyncEngine, processor) -> LiveServer:
    state = make_state(config, engine, processor)
    return LiveServer(build_app(state), state)


def with_media(config: ServeConfig, **media) -> ServeConfig:
    return replace(config, media=replace(config.media, **media))


def png_bytes(color=(200, 30, 30), size=(40, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


class ImageHost:
    """/red.png, /slow.png (sleeps), /redirect?to=URL, /big.png (declares a huge length)."""

    def __init__(self):
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("to=", 1)[1])
                    self.end_headers()
                elif self.path == "/slow.png":
                    time.sleep(host.slow_seconds)
                    self._send(png_bytes())
                elif self.path == "/red.png":
                    self._send(png_bytes())
                else:
                    self.send_response(404)
                    self.end_headers()

            def _send(self, body: bytes):
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.slow_seconds = 3.0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
