"""Peak host memory while loading a multi-GB checkpoint, relative to the checkpoint's size.

Writes a random CogVLM-shaped checkpoint (bf16, sharded like the official ones) and loads it
in a fresh process with model.weights.load_model, then reports that process's peak RSS.
Target: peak RSS < checkpoint size + largest shard + 1 GB.

    python benchmarks/load_weights.py [--dir /tmp/cogserve-bench-ckpt] [--layers 16] [--shards 4]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from model.cogvlm import CogVLMForCausalLM
from model.config import CogVLMConfig, VisionConfig

GiB = 1 << 30


def bench_config(num_layers: int) -> CogVLMConfig:
    """Half of CogVLM-17B's width: about 0.1 B parameters a layer, 3.5 GB at 16 layers in bf16."""
    vision = VisionConfig(
        image_size=224, patch_size=14, hidden_size=1024, num_layers=8, num_heads=16, intermediate_size=4096
    )
    return CogVLMConfig(
        hidden_size=2048, intermediate_size=5504, num_layers=num_layers, num_heads=16, num_kv_heads=16, vision=vision
    )


def write_checkpoint(cfg: CogVLMConfig, folder: Path, num_shards: int) -> None:
    """Shard by bytes, generating one shard at a time so the writer never holds the model."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CogVLMForCausalLM(cfg).state_dict().items()}
    total = sum(math.prod(s) * 2 for s in shapes.values())
    budget, shards, current, size = total / num_shards, [], [], 0
    for key in sorted(shapes):
        current.append(key)
        size += math.prod(shapes[key]) * 2
        if size >= budget and len(shards) < num_shards - 1:
            shards.append(current)
            current, size = [], 0
    shards.append(current)
    weight_map = {}
    for i, keys in enumerate(tqdm(shards, desc="writing shards")):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: torch.randn(shapes[k]).mul_(0.02).to(torch.bfloat16) for k in keys}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))


CHILD = """
import resource, sys, time, torch
from model.weights import load_model
start = time.perf_counter()
model = load_model(sys.argv[1], torch.bfloat16, "cpu")
seconds = time.perf_counter() - start
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# NOTE: on CPU with an unchanged dtype safetensors hands back memory-mapped storage, so pages
# count only once read; read every weight once, as the first forward would.
for p in model.parameters():
    p.max()
print(after_load, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, seconds)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "config.json").exists():
            write_checkpoint(bench_config(args.layers), folder, args.shards)
        shard_sizes = [p.stat().st_size for p in folder.glob("*.safetensors")]
        done = subprocess.run([sys.executable, "-c", CHILD, str(folder)], check=True, capture_output=True, text=True)
        after_load, peak, seconds = done.stdout.split()
        after_load, peak, checkpoint, largest = int(after_load), int(peak), sum(shard_sizes), max(shard_sizes)
        target = checkpoint + largest + GiB
        print(f"checkpoint {checkpoint / GiB:.2f} GiB in {len(shard_sizes)} shards (largest {largest / GiB:.2f} GiB)")
        print(
            f"load time {float(seconds):.1f} s, peak RSS after load {after_load / GiB:.2f} GiB, after reading "
            f"every weight {peak / GiB:.2f} GiB = {peak / checkpoint:.2f}x checkpoint"
        )
        print(
            f"target: peak < checkpoint + largest shard + 1 GiB = {target / GiB:.2f} GiB -> "
            f"{'met' if peak < target else 'MISSED'} ({peak / target:.2f} of target)"
        )


if __name__ == "__main__":
    main()
