"""Frozen configs, one per command, built once by server/cli.py's argparse."""

from __future__ import annotations

from dataclasses import dataclass

from model.processor import DEFAULT_MAX_IMAGE_PIXELS
from server.engine import EngineConfig
from server.media import MediaConfig

DEFAULT_MODEL = "models/cogvlm-tiny-shapes"  # the embedded default: trained on synthetic shapes (issue 7)


@dataclass(frozen=True)
class ModelConfig:
    model: str = DEFAULT_MODEL  # checkpoint folder (HF layout)
    tokenizer: str | None = None  # tokenizer folder; default: the checkpoint folder
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto: checkpoint dtype on GPU, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # decompression-bomb cap, checked before decoding


@dataclass(frozen=True)
class GenerateConfig:
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    image: str | None = None  # image file for --prompt
    prompt: str | None = None  # one user question
    messages: str | None = None  # JSON file with an OpenAI-style messages array
    template: str | None = None  # chat | vqa | base; default: the checkpoint's template_version
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None
    top_logprobs: int = 0
    json: bool = False  # print one JSON object instead of the text


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # the name clients send as "model"; default: the folder's name
    api_key: str | None = None  # when set, /v1/*, /(de)tokenize, /tokenizer_info need "Authorization: Bearer <key>"
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers
    max_queued_requests: int = 512  # beyond this many waiting requests: 503 with Retry-After
    max_request_bytes: int = 32 * 2**20  # request bodies (data: URIs included); larger: 413
    max_n: int = 16  # completions per request
    request_timeout_s: float = 600.0  # per request, queueing included
    shutdown_timeout_s: float = 30.0  # SIGTERM: in-flight requests get this long to finish
    # sampling defaults for what a request leaves unset (model/generation_config.py): auto (the
    # checkpoint's generation_config.json, if any), none, or a folder holding one
    generation_config: str = "auto"
    enable_tokenizer_info: bool = False  # GET /tokenizer_info (vLLM's, opt-in as there): lm-eval's remote tokenizer


@dataclass(frozen=True)
class ServeConfig:
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    server: ServerConfig = ServerConfig()
    media: MediaConfig = MediaConfig()
