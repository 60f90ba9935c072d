"""GPU: a few decoder layers over one prefill step, by how the routed projections get their rows:
issue 3's target (within 1.15x of the dense GEMMs) measured where the model pays it.

bench_expert_linear.py times each projection alone. Here the layers run whole (norms, residual
adds, silu * up) on a full-size architecture with random bf16 weights, in four ways, timed in
turns in one process:

- dense: every row through the language expert, as if the step held no vision row: cuBLAS's
  GEMMs and the dense path's kernels, the floor;
- gathered: kernels/expert_linear.py over the batch's row order (the engine's default);
- grouped: the rows carried in the routing's slot order (--expert-rows grouped) through
  kernels/grouped_expert_linear.py, with the gathers it costs (into slot order at the start, out
  and back around each layer's attention, out at the end);
- peers: gather -> two cuBLAS GEMMs -> scatter for each projection, gate and up apart (the torch
  references; bench_expert_linear.py's peers fuse gate and up, a stronger baseline).

Attention itself is left out (its backend hands q back as the context): it is the same work in
every way, and would only dilute the ratios. The steps: one one-image request; a step of the
engine's default 2048-token budget, cut from one-image requests back to back (its rows switch
expert mid-request, as chunked prefill's do); four one-image requests at once.

    python benchmarks/bench_expert_layers.py [--arch cogvlm-17b|cogvlm2-19b|both] [--layers 4]
    python benchmarks/bench_expert_layers.py --arch tiny --device cpu    # smoke test of this script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import torch

import model.experts as experts
from benchmarks.full_size import ARCHITECTURES, random_model
from benchmarks.kernels.bench_expert_linear import GROUPED, TEXT_TOKENS, bench_interleaved, rel_err, serving_mask
from kernels.expert_routing import from_slots, route_by_expert, to_slots
from model.cogvlm import CogVLMForCausalLM
from model.gemv_tuning import graph_ms

# gpu_check.sh sets COGSERVE_BENCH_GROUPED=0 when the grouped kernel's GPU tests failed or hung:
# its columns then read NaN
MODES = ("dense", "gathered", "grouped", "peers") if GROUPED else ("dense", "gathered", "peers")
STEP_BUDGET = 2048  # EngineConfig.max_num_batched_tokens


class QueryAsContext:
    """An attention backend that returns a copy of q as the context ([T, H * D]): no rotary, no
    scores. A copy, as a real backend writes its output to a tensor of its own (q is a strided
    view of the QKV projection's output)."""

    def attend(self, layer_idx, q, k, v, cos_sin) -> torch.Tensor:
        return q.reshape(q.shape[0], -1).contiguous()


def steps(num_image: int, device) -> dict[str, torch.Tensor]:
    """{name: vision mask} of the timed steps (see the module docstring)."""
    back_to_back = serving_mask(-(-STEP_BUDGET // (num_image + TEXT_TOKENS)), num_image, device)
    return {
        "one image": serving_mask(1, num_image, device),
        f"{STEP_BUDGET}-token step": back_to_back[:STEP_BUDGET],
        "four images": serving_mask(4, num_image, device),
    }


@contextlib.contextmanager
def torch_projections():
    """The routed projections through model/experts.py's CPU path (the torch references: gather,
    two GEMMs, scatter; silu * up in torch) on this device; the norms keep their kernels."""
    use_triton = experts.use_triton
    experts.use_triton = lambda x: False
    try:
        yield
    finally:
        experts.use_triton = use_triton


def forward_in(model: CogVLMForCausalLM, mode: str, embeds, positions, mask):
    """A callable that runs the layers (and the final norm) one way (MODES)."""
    attention = QueryAsContext()
    vision_mask = None if mode == "dense" else mask

    def call() -> torch.Tensor:
        model.use_grouped_expert_rows(mode == "grouped")
        with torch_projections() if mode == "peers" else contextlib.nullcontext():
            return model(embeds, positions, vision_mask, attention)

    return call


def once_ms(fn) -> float:
    """CPU (the smoke test): one call's wall time."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def slot_gathers(cfg, num_layers: int, mask: torch.Tensor, dtype: torch.dtype):
    """A callable that runs the grouped way's gathers alone, at its shapes: into slot order and out
    at the ends, and each layer's two around attention. Its share of the grouped way's time is what
    folding them into the attention kernels (reading and writing rows through the routing) could save."""
    routing = route_by_expert(mask, in_slots=True)
    hidden = torch.randn(mask.shape[0], cfg.hidden_size, device=mask.device, dtype=dtype)
    qkv = torch.randn(routing.num_slots, cfg.qkv_size, device=mask.device, dtype=dtype)
    ctx = torch.randn(mask.shape[0], cfg.num_heads * cfg.head_dim, device=mask.device, dtype=dtype)

    def call() -> None:
        slots = to_slots(hidden, routing)
        for _ in range(num_layers):
            from_slots(qkv, routing)
            to_slots(ctx, routing)
        from_slots(slots, routing)
        from_slots(slots, routing)  # the residual's

    return call


@torch.inference_mode()
def run_arch(arch: str, num_layers: int, device: str, dtype: torch.dtype) -> list[dict]:
    cfg = ARCHITECTURES[arch]()
    model = random_model(arch, device, dtype, num_layers=num_layers)
    model.fuse_for_inference()  # the dense path's one gate_up GEMM, as the engine runs it
    cuda = device == "cuda"
    rows = []
    for step, mask in steps(cfg.num_image_tokens, device).items():
        num_rows = mask.shape[0]
        embeds = torch.randn(num_rows, cfg.hidden_size, device=device, dtype=dtype)
        positions = torch.arange(num_rows, device=device)
        calls = {mode: forward_in(model, mode, embeds, positions, mask) for mode in MODES}
        outs = {mode: call() for mode, call in calls.items()}  # compiles and tunes outside the timing
        row = {"arch": arch, "step": step, "rows": num_rows, "vision_rows": int(mask.sum()), "layers": num_layers}
        row |= {key: math.nan for key in ("grouped_ms", "grouped_graph_ms", "grouped_err", "gathers_ms")}
        for mode in MODES:
            if mode in ("gathered", "grouped"):
                row[f"{mode}_err"] = rel_err(outs[mode], outs["peers"].float())
        if cuda:
            row |= {f"{mode}_ms": ms for mode, ms in bench_interleaved(calls).items()}
            for mode in MODES:
                if mode != "peers":  # the peers' boolean indexing syncs with the host: no graph
                    row[f"{mode}_graph_ms"] = graph_ms(calls[mode])
            row["gathers_ms"] = graph_ms(slot_gathers(cfg, num_layers, mask, dtype))  # replayed, as grouped's
        else:
            row |= {f"{mode}_ms": once_ms(call) for mode, call in calls.items()}
            row |= {f"{mode}_graph_ms": math.nan for mode in MODES if mode != "peers"}
            row["gathers_ms"] = once_ms(slot_gathers(cfg, num_layers, mask, dtype))
        rows.append(row)
    model.use_grouped_expert_rows(False)
    return rows


def ratio_table(rows: list[dict]) -> list[str]:
    lines = [
        "| arch | step | rows | dense ms | gathered / dense | grouped / dense | peers / dense | graphed: "
        "gathered / dense | grouped / dense | grouped's gathers | err gathered, grouped |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, dg = r["dense_ms"], r["dense_graph_ms"]
        lines.append(
            f"| {r['arch']} | {r['step']} | {r['rows']} | {d:.3f} | {r['gathered_ms'] / d:.3f} | "
            f"{r['grouped_ms'] / d:.3f} | {r['peers_ms'] / d:.3f} | {r['gathered_graph_ms'] / dg:.3f} | "
            f"{r['grouped_graph_ms'] / dg:.3f} | {r['gathers_ms'] / r['grouped_graph_ms']:.1%} | "
            f"{r['gathered_err']:.1e}, {r['grouped_err']:.1e} |"
        )
    return lines


def geomeans(rows: list[dict]) -> dict[str, float]:
    """Geomean over the steps of each way's time against dense's, eager and graphed."""

    def geo(values):
        return math.exp(sum(math.log(v) for v in values) / len(values))

    out = {f"{m}/dense": geo([r[f"{m}_ms"] / r["dense_ms"] for r in rows]) for m in ("gathered", "grouped", "peers")}
    for m in ("gathered", "grouped"):
        out[f"{m}/dense graphed"] = geo([r[f"{m}_graph_ms"] / r["dense_graph_ms"] for r in rows])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="both", choices=["both", *sorted(ARCHITECTURES)])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers run (weights: ~0.8 GB a 17B layer)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    archs = ["cogvlm-17b", "cogvlm2-19b"] if args.arch == "both" else [args.arch]
    rows = []
    for arch in archs:
        rows += run_arch(arch, args.layers, args.device, dtype)
        if cuda:
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"expert layers, {args.layers} decoder layers a step, attention left out, {device_name}")
    print("\n".join(ratio_table(rows)))
    means = geomeans(rows)
    print("geomean of the layers' time against dense: " + ", ".join(f"{k} {v:.3f}x" for k, v in means.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "geomeans": means}, f, indent=1)


if __name__ == "__main__":
    main()
