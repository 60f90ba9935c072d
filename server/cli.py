"""`cogserve` command line: serve, generate, init-tiny."""

from __future__ import annotations

import argparse
import logging
import math
import sys

from server.config import DEFAULT_MODEL, GenerateConfig, ModelConfig, ServeConfig, ServerConfig
from server.engine import EngineConfig
from server.media import MediaConfig

logger = logging.getLogger(__name__)


def number(kind: type, low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a `kind` in [low, high] ((low, high] with low_open). A bad value is an
    argparse error naming the flag, before anything loads."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {text}")
        return value

    return parse


COUNT = number(int, 1)  # sizes and limits: at least one
SECONDS = number(float, 0, low_open=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogserve", description="Serve and run CogVLM models.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate once through the engine")
    add_model_args(gen)
    add_engine_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one user question (with --image for an image)")
    source.add_argument("--messages", help="JSON file with an OpenAI-style messages array")
    gen.add_argument("--image", help="image file to ask about (with --prompt)")
    gen.add_argument("--template", choices=["chat", "vqa", "base"], help="default: the checkpoint's")
    gen.add_argument("--max-tokens", type=COUNT, default=GenerateConfig.max_tokens)
    gen.add_argument("--temperature", type=number(float, 0), default=GenerateConfig.temperature)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument(
        "--top-logprobs", type=number(int, 0, 20), default=0, help="K best [token_id, logprob] per token (<= 20)"
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_model_args(serve)
    add_engine_args(serve)
    add_server_args(serve)

    tiny = commands.add_parser("init-tiny", help="write a random-weight tiny checkpoint for tests")
    tiny.add_argument("out_dir")
    tiny.add_argument("--generation", type=int, choices=[1, 2], default=1)
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder (HF layout)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-model-len", type=COUNT, default=None)
    parser.add_argument("--max-image-pixels", type=COUNT, default=ModelConfig.max_image_pixels)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    d, m = ServerConfig(), MediaConfig()
    parser.add_argument("--host", default=d.host)
    parser.add_argument("--port", type=number(int, 0, 65535), default=d.port)
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: folder name)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize and "
                        "/tokenizer_info")  # fmt: skip
    parser.add_argument("--allowed-origins", nargs="*", default=[], help="CORS origins, e.g. https://app.example")
    parser.add_argument("--max-queued-requests", type=number(int, 0), default=d.max_queued_requests)
    parser.add_argument("--max-request-bytes", type=COUNT, default=d.max_request_bytes)
    parser.add_argument("--max-n", type=COUNT, default=d.max_n, help="completions per request at most")
    parser.add_argument("--request-timeout", type=SECONDS, default=d.request_timeout_s, help="seconds per request")
    parser.add_argument("--shutdown-timeout", type=number(float, 0), default=d.shutdown_timeout_s,
                        help="seconds in-flight requests get after SIGTERM")  # fmt: skip
    parser.add_argument("--generation-config", default=d.generation_config, metavar="{auto,none,FOLDER}",
                        help="sampling defaults for fields a request leaves unset: auto, the checkpoint's "
                        "generation_config.json (vLLM's default); none, OpenAI's; or a folder holding one")  # fmt: skip
    parser.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                        help="serve GET /tokenizer_info (the tokenizer's config), as vLLM does")  # fmt: skip
    parser.add_argument("--image-fetch-timeout", type=SECONDS, default=m.fetch_timeout_s)
    parser.add_argument("--image-connect-timeout", type=SECONDS, default=m.connect_timeout_s)
    parser.add_argument("--max-image-bytes", type=COUNT, default=m.max_image_bytes)
    parser.add_argument("--max-image-redirects", type=number(int, 0), default=m.max_redirects)
    parser.add_argument("--allow-private-image-urls", action="store_true",
                        help="on-prem: allow image URLs on private, loopback and link-local addresses")  # fmt: skip
    parser.add_argument(
        "--allowed-image-hosts", nargs="*", default=[], help="image hosts allowed whatever they resolve to"
    )
    parser.add_argument("--local-image-dir", default=None, help="allow image file paths under this folder")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    server = ServerConfig(
        host=args.host, port=args.port, served_model_name=args.served_model_name, api_key=args.api_key,
        allowed_origins=tuple(args.allowed_origins), max_queued_requests=args.max_queued_requests,
        max_request_bytes=args.max_request_bytes, max_n=args.max_n, request_timeout_s=args.request_timeout,
        shutdown_timeout_s=args.shutdown_timeout, generation_config=args.generation_config,
        enable_tokenizer_info=args.enable_tokenizer_info_endpoint,
    )  # fmt: skip
    media = MediaConfig(
        fetch_timeout_s=args.image_fetch_timeout, connect_timeout_s=args.image_connect_timeout,
        max_image_bytes=args.max_image_bytes, max_redirects=args.max_image_redirects,
        allow_private_networks=args.allow_private_image_urls, allowed_hosts=tuple(args.allowed_image_hosts),
        local_image_dir=args.local_image_dir, max_image_pixels=args.max_image_pixels,
    )  # fmt: skip
    return ServeConfig(model=model_config(args), engine=engine_config(args), server=server, media=media)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    parser.add_argument("--max-num-seqs", type=COUNT, default=d.max_num_seqs, help="running requests at most")
    parser.add_argument("--max-num-batched-tokens", type=COUNT, default=d.max_num_batched_tokens,
                        help="tokens per step; long prompts are split into chunks of at most this")  # fmt: skip
    parser.add_argument("--block-size", type=COUNT, default=d.block_size, help="tokens per KV block")
    parser.add_argument(
        "--kv-cache-gb", type=number(float, 0, low_open=True), default=d.kv_cache_gb, help="KV pool size on CPU"
    )
    parser.add_argument("--gpu-memory-fraction", type=number(float, 0, 1, low_open=True), default=d.gpu_memory_fraction,
                        help="share of free GPU memory (after loading) for the KV pool")  # fmt: skip
    parser.add_argument("--no-prefix-caching", action="store_true", help="disable KV reuse across requests")
    parser.add_argument(
        "--attention-backend",
        default=d.attention_backend,
        choices=["auto", "torch", "triton", "flash_attn"],
        help="auto: triton on CUDA, torch on CPU; flash_attn: [gpu] extra + --block-size 256",
    )
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs: decode steps run eagerly (slower; for debugging)")  # fmt: skip
    parser.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                        help="look-ahead steps hide host work behind the GPU (auto: on with CUDA)")  # fmt: skip
    parser.add_argument("--one-row-gemv", action=argparse.BooleanOptionalAction, default=d.one_row_gemv,
                        help="CUDA: batch-1 decodes use our GEMV kernel (norms fused in), not cuBLAS")  # fmt: skip
    parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=d.pdl,
                        help="CUDA sm_90+: decode kernels start while the one before drains (PDL)")  # fmt: skip
    parser.add_argument("--tuned-gemv-configs", action=argparse.BooleanOptionalAction, default=d.pin_tuned_gemvs,
                        help="CUDA: batch-1 GEMVs of the shapes tuned for this card (kernels/gemv.py TUNED) "
                             "launch those configs; off: the autotuner picks at start")  # fmt: skip
    parser.add_argument("--expert-rows", default=d.expert_rows, choices=["gathered", "grouped"],
                        help="steps with image rows: keep the batch's row order (gathered) or carry the rows "
                             "grouped by expert through the layers (grouped; CUDA: sm_90 or later)")  # fmt: skip
    parser.add_argument("--skip-kernel-tuning", action="store_true",
                        help="CUDA: do not autotune the expert kernels at start (each row bucket then tunes "
                             "on its first image step, about a second a shape, stalling running requests)")  # fmt: skip


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, block_size=args.block_size, kv_cache_gb=args.kv_cache_gb,
        gpu_memory_fraction=args.gpu_memory_fraction, enable_prefix_caching=not args.no_prefix_caching,
        attention_backend=args.attention_backend, cuda_graphs=not args.enforce_eager,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        one_row_gemv=args.one_row_gemv, pdl=args.pdl, tune_expert_kernels=not args.skip_kernel_tuning,
        pin_tuned_gemvs=args.tuned_gemv_configs, expert_rows=args.expert_rows,
    )  # fmt: skip


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_image_pixels=args.max_image_pixels,
    )


def generate_config(args: argparse.Namespace) -> GenerateConfig:
    if args.image and not args.prompt:
        raise ValueError("--image goes with --prompt; with --messages put the image in a message")
    return GenerateConfig(
        model=model_config(args),
        engine=engine_config(args),
        image=args.image,
        prompt=args.prompt,
        messages=args.messages,
        template=args.template,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        top_logprobs=args.top_logprobs,
        json=args.json,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from model.config import ConfigError
    from model.processor import PromptError
    from model.weights import WeightsError

    try:
        if args.command == "generate":
            from server.generate_command import run_generate

            return run_generate(generate_config(args))
        if args.command == "serve":
            from server.serve_command import run_serve

            return run_serve(serve_config(args))
        if args.command == "init-tiny":
            from model.tiny_checkpoint import write_tiny_checkpoint

            cfg = write_tiny_checkpoint(args.out_dir, args.generation, seed=args.seed)
            print(f"wrote a tiny CogVLM generation {cfg.generation} checkpoint to {args.out_dir}")
            return 0
    except (ConfigError, WeightsError, PromptError, ValueError, OSError) as err:
        print(f"cogserve {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 1
