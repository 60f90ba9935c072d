"""GPU prefill: time to first token for image requests on a full-size CogVLM architecture with
random bf16 weights, through the engine, and where it goes.

Reports, for one image request alone and for `--images` distinct image requests at once (no
prefix or encoder cache hits: every image differs):
- time to first token, and the vision tower's share of it (CUDA events around each encoder call);
- prefill tokens/s, and the matmul FLOP rate reached against a large bf16 cuBLAS GEMM timed in
  the same run (a ratio, as the decode benchmark's floor is: the card's datasheet peak is not
  what a GEMM reaches).

The FLOPs counted are the linear layers' (2 x weights x rows, each row through one expert); the
attention scores are left out, so the rate is a lower bound.

    python benchmarks/bench_prefill.py [--arch cogvlm-17b|cogvlm2-19b] [--images 8] [--expert-rows grouped]
    python benchmarks/bench_prefill.py --arch tiny --device cpu    # smoke test of this script
"""

from __future__ import annotations

import argparse
import io
import time

import torch
import triton
from PIL import Image
from torch import nn

from benchmarks.full_size import ARCHITECTURES, DigitTokenizer, random_model
from benchmarks.synthetic_images import synthetic_image
from model.cogvlm import CogVLMForCausalLM
from model.processor import Conversation, Processor, PromptInputs
from model.sampling_params import SamplingParams
from server.engine import Engine, EngineConfig


def linear_flops(model: CogVLMForCausalLM, prompt: PromptInputs) -> float:
    """2 x weights x rows for each linear layer a prompt's prefill runs: the vision tower over its
    patches, each token through its own expert's projections, the lm_head on the last token."""
    vision = model.model.vision

    def weights(module: nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

    image_flops = 0
    if prompt.pixels is not None:
        patches = (model.config.vision.image_size // model.config.vision.patch_size) ** 2 + 1  # and cls
        adapted = len(prompt.image_slots) - 2  # boi and eoi are parameters, not computed
        image_flops = weights(vision.transformer) * patches + weights(vision.linear_proj) * adapted
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp.language_mlp
    per_token = sum(
        m.weight.numel()
        for m in (attn.language_expert_query_key_value, attn.language_expert_dense, mlp.gate_proj, mlp.up_proj,
                  mlp.down_proj)
    ) * len(model.model.layers)  # fmt: skip
    return 2.0 * (image_flops + per_token * prompt.num_tokens + model.lm_head.weight.numel())


def gemm_flops_per_s(device: str, dtype: torch.dtype) -> float:
    """A large GEMM's rate on this device in the model's dtype (CPU: a small one, for the smoke test)."""
    n = 8192 if device == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if device == "cuda":
        ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    else:
        start = time.perf_counter()
        a @ b
        ms = (time.perf_counter() - start) * 1e3
    return 2 * n**3 / (ms / 1e3)


def image(seed: int, size: int) -> Image.Image:
    """A distinct image per seed (so no encoder or prefix cache hit), as the load tests draw them."""
    return Image.open(io.BytesIO(synthetic_image(seed, size)))


def time_to_first_tokens(engine: Engine, prompts: list[PromptInputs], sync) -> tuple[float, list[float]]:
    """Seconds until every request has its first token, and the vision tower's seconds meanwhile."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    engine.runner.drain_encode_seconds()
    sync()
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished:
        engine.step()
    sync()
    elapsed = time.perf_counter() - start
    return elapsed, engine.runner.drain_encode_seconds()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cogvlm-17b", choices=sorted(ARCHITECTURES))
    parser.add_argument("--images", type=int, default=8, help="image requests sent at once in the second case")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--expert-rows", default=EngineConfig.expert_rows, choices=["gathered", "grouped"],
                        help="the engine's row order for image steps (serve's --expert-rows)")  # fmt: skip
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = random_model(args.arch, args.device, dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gemm_rate = gemm_flops_per_s(args.device, dtype)
    processor = Processor(DigitTokenizer(), model.config)
    size = model.config.vision.image_size

    def prompts(count: int, first_seed: int) -> list[PromptInputs]:
        query = "What is in the image? Describe it in detail."
        return [processor.build(Conversation(query=query, image=image(first_seed + i, size))) for i in range(count)]

    engine = Engine(model, processor, EngineConfig(gpu_memory_fraction=0.5, num_kv_blocks=None if cuda else 2048,
                                                   expert_rows=args.expert_rows))  # fmt: skip
    time_to_first_tokens(engine, prompts(1, 10_000), sync)  # warm-up: kernels compiled, graphs captured
    print(f"prefill, {args.arch} architecture, random weights, {torch.cuda.get_device_name() if cuda else 'CPU'}, "
          f"{args.expert_rows} expert rows")  # fmt: skip
    print(f"{str(dtype).removeprefix('torch.')} GEMM ({'8192' if cuda else '256'}^3): {gemm_rate / 1e12:.2f} TFLOP/s")
    print("| requests | prompt tokens | time to first tokens ms | vision tower ms | vision share | "
          "prefill tokens/s | linear TFLOP/s | vs GEMM |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for count, seed in ((1, 0), (args.images, 100)):
        batch = prompts(count, seed)
        elapsed, vision = time_to_first_tokens(engine, batch, sync)
        tokens = sum(p.num_tokens for p in batch)
        rate = sum(linear_flops(model, p) for p in batch) / elapsed
        print(f"| {count} | {tokens} | {elapsed * 1e3:.1f} | {sum(vision) * 1e3:.1f} | {sum(vision) / elapsed:.2f} | "
              f"{tokens / elapsed:.0f} | {rate / 1e12:.1f} | {rate / gemm_rate:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
