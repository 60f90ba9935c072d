"""The FastAPI app: OpenAI-compatible routes, API key, body cap, request ids, errors, metrics."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.generation_config import GenerationDefaults
from model.processor import Processor, PromptError
from server.async_engine import AsyncEngine
from server.chat import ChatHandler
from server.completions import CompletionHandler
from server.config import ServeConfig
from server.conversation import parse_messages
from server.errors import APIError, bad_request, model_not_found, unavailable
from server.media import ImageFetcher
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

logger = logging.getLogger(__name__)
VERSION = "0.1.0"
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
# pydantic's labels for the branch of a union in an error's location: `str`, `list[...]`
UNION_BRANCH = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|tagged-union\[.*\])$")


@dataclass
class AppState:
    """What the routes share. `engine` and `processor` arrive once the model has loaded."""

    config: ServeConfig
    served_model_name: str
    metrics: Metrics
    fetcher: ImageFetcher
    engine: AsyncEngine | None = None
    processor: Processor | None = None
    max_model_len: int = 0
    generation_defaults: GenerationDefaults = GenerationDefaults()  # the checkpoint's sampling defaults
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.dead is None

    def check_accepting(self) -> None:
        if self.draining:
            raise unavailable("the server is shutting down", retry_after_s=5)
        if not self.ready:
            raise unavailable("the model is still loading" if self.engine is None else "the engine stopped")


class BodyLimit:
    """ASGI middleware: 413 for a body over the cap, whether or not Content-Length says so."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        too_large = APIError(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large.response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await too_large.response()(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def tokenizer_config(tokenizer) -> dict:
    """The tokenizer's init kwargs as JSON: special tokens as their text, other objects as strings;
    files and the path it was loaded from are this machine's business, and are left out."""

    def plain(value):
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return str(getattr(value, "content", value))  # tokenizers' AddedToken: its text

    kwargs = dict(getattr(tokenizer, "init_kwargs", None) or {})
    left_out = ("name_or_path", "tokenizer_object", "added_tokens_decoder")
    config = {k: plain(v) for k, v in kwargs.items() if not k.endswith("_file") and k not in left_out}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        config.setdefault(name, plain(getattr(tokenizer, name, None)))
    return {"tokenizer_class": type(tokenizer).__name__, **config}


def build_app(state: AppState) -> FastAPI:
    server = state.config.server
    app = FastAPI(title="cogserve", version=VERSION, description="OpenAI-compatible server for CogVLM")
    app.state.cogserve = state
    chat = ChatHandler(state)
    completions = CompletionHandler(state)

    @app.middleware("http")
    async def request_id_and_key(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = request_id
        if server.api_key and request.url.path.startswith(PROTECTED_PREFIXES):
            supplied = request.headers.get("authorization", "")
            if not hmac.compare_digest(supplied.encode(), f"Bearer {server.api_key}".encode()):
                response = APIError(401, "invalid or missing API key", code="invalid_api_key").response()
                response.headers["X-Request-Id"] = request_id
                state.metrics.responded(401)
                return response
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 -- the one place a real fault becomes a logged 500
            logger.exception("request %s failed", request_id)
            response = APIError(500, f"internal error (request id {request_id})", code="internal_error").response()
        response.headers["X-Request-Id"] = request_id
        state.metrics.responded(response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError):
        return err.response()

    @app.exception_handler(_BodyTooLarge)
    async def body_too_large(_request: Request, _err: _BodyTooLarge):
        return APIError(
            413, f"request body exceeds {server.max_request_bytes} bytes", code="request_too_large"
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        """Unknown routes (404) and methods (405) in OpenAI's error shape too, not FastAPI's {"detail"}."""
        return APIError(err.status_code, str(err.detail), code=_HTTP_CODES.get(err.status_code),
                        headers=dict(err.headers or {})).response()  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, err: RequestValidationError):
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return bad_request("request body is not valid JSON", None, "invalid_json").response()
        # A union (content: a string or a list of parts) fails once per branch; the deepest error is
        # the one that names what is wrong (a part's unknown type, not "should be a valid string").
        first = max(errors, key=lambda e: len(e.get("loc", ())), default={})
        if tuple(first.get("loc", ())) == ("body",):  # no JSON object: FastAPI parses only a JSON content type
            return bad_request("the request body must be a JSON object, sent with Content-Type: application/json",
                               None, "invalid_json").response()  # fmt: skip
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not UNION_BRANCH.match(str(p))]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return bad_request(message, ".".join(loc) or None).response()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat(body, request)

    @app.post("/v1/completions")
    async def text_completions(body: CompletionRequest, request: Request):
        return await completions(body, request)

    def model_card() -> dict:
        return {"id": state.served_model_name, "object": "model", "created": state.created, "owned_by": "cogserve",
                "max_model_len": state.max_model_len}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")  # OpenAI's "retrieve model"; :path: names may hold slashes
    async def model(model: str):
        if model != state.served_model_name:
            raise model_not_found(model)
        return model_card()

    @app.get("/health")
    async def health():
        if state.draining or not state.ready:
            reason = "draining" if state.draining else "loading" if state.engine is None else "engine stopped"
            return JSONResponse({"status": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.head("/health", include_in_schema=False)  # some load balancers probe with HEAD
    async def health_head():
        return await health()

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        """Prompt tokens as the model will see them, image slots included; no image is fetched. A
        `prompt` is tokenized as /v1/completions takes it."""
        state.check_accepting()
        if body.model is not None and body.model != state.served_model_name:
            raise model_not_found(body.model)
        if (body.messages is None) == (body.prompt is None):
            raise bad_request("give one of messages (a chat) and prompt (a completion)", "messages")
        if body.prompt is not None:
            prompt = state.processor.build_text(body.prompt, body.add_special_tokens)
            return {"count": prompt.num_tokens, "max_model_len": state.max_model_len, "tokens": prompt.input_ids}
        try:
            conversation, image_url = parse_messages([m.model_dump(exclude_none=True) for m in body.messages])
        except PromptError as err:
            raise bad_request(str(err), "messages") from err
        if image_url:  # slots depend only on the image being there: a blank stand-in
            size = state.processor.cfg.vision.image_size
            conversation = replace(conversation, image=Image.new("RGB", (size, size)))
        prompt = state.processor.build(conversation, body.template)
        return {"count": prompt.num_tokens, "max_model_len": state.max_model_len, "tokens": prompt.input_ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        """vLLM's: token ids back to text, special tokens as written (<s>, </s>)."""
        state.check_accepting()
        if body.model is not None and body.model != state.served_model_name:
            raise model_not_found(body.model)
        vocab_size = state.processor.cfg.vocab_size
        outside = [t for t in body.tokens if not 0 <= t < vocab_size]
        if outside:
            raise bad_request(f"tokens must be ids in [0, {vocab_size}), got {outside[:5]}", "tokens")
        return {"prompt": state.processor.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    if server.enable_tokenizer_info:

        @app.get("/tokenizer_info")
        async def tokenizer_info():
            """vLLM's: the tokenizer's class and config (special tokens; model_max_length: the served
            context), which lm-eval's remote tokenizer reads."""
            state.check_accepting()
            return {**tokenizer_config(state.processor.tokenizer), "model_max_length": state.max_model_len}

    if server.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(server.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])  # fmt: skip
    app.add_middleware(BodyLimit, max_bytes=server.max_request_bytes)
    return app
