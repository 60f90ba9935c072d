"""Load an HF-format CogVLM checkpoint folder, unchanged, shard by shard.

The model is built on the meta device (no random init of 17B parameters); each shard is
memory-mapped and each tensor cast and moved straight to the target device, so host memory
peaks near one shard (benchmarks/load_weights.py measures it), not the whole checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from model.cogvlm import CogVLMForCausalLM
from model.config import CogVLMConfig

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Rotary tables some exports carry; we compute our own.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
PROGRESS_MIN_BYTES = 1 << 30  # a progress bar only where a person waits


class WeightsError(ValueError):
    """A checkpoint that does not match the model; the message names the file and the key."""


def checkpoint_files(folder: Path) -> dict[Path, list[str] | None]:
    """{shard file: keys the index puts there (None: read them from the file)}."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise WeightsError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from err
        shards: dict[Path, list[str]] = defaultdict(list)
        for key, name in weight_map.items():
            shards[folder / name].append(key)
        for shard in shards:
            if not shard.is_file():
                raise WeightsError(f"{index}: names shard '{shard.name}', which is not in {folder}")
        return dict(sorted(shards.items()))
    single = folder / SINGLE_FILE
    if single.is_file():
        return {single: None}
    raise WeightsError(f"{folder}: neither {INDEX_FILE} nor {SINGLE_FILE} found (only safetensors is supported)")


def resolve_dtype(name: str, cfg: CogVLMConfig, device: torch.device) -> torch.dtype:
    """'auto' is the checkpoint's dtype on GPU and float32 on CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        name = cfg.torch_dtype if device.type == "cuda" else "float32"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return dtypes[name]


def load_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cfg: CogVLMConfig | None = None,
) -> CogVLMForCausalLM:
    folder = Path(folder)
    cfg = cfg or CogVLMConfig.from_checkpoint(folder)
    device = torch.device(device)
    with torch.device("meta"):
        model = CogVLMForCausalLM(cfg)
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    shards = checkpoint_files(folder)
    total_bytes = sum(shard.stat().st_size for shard in shards)
    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="loading weights",
        disable=total_bytes < PROGRESS_MIN_BYTES,
    )
    for shard, index_keys in shards.items():
        try:
            loaded |= _load_shard(shard, index_keys, expected, model, device, dtype)
        except SafetensorError as err:  # a cut-short download: a header or tensor past the file's end
            raise WeightsError(f"{shard}: not a readable safetensors file ({err}); a partial download?") from err
        bar.update(shard.stat().st_size)
    bar.close()
    missing = sorted(set(expected) - loaded)
    if missing:
        where = folder / (INDEX_FILE if (folder / INDEX_FILE).is_file() else SINGLE_FILE)
        raise WeightsError(f"{where}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    logger.info("loaded %d tensors from %d file(s) in %s as %s", len(loaded), len(shards), folder, dtype)
    return model.eval()


def _load_shard(shard: Path, index_keys: list[str] | None, expected: dict, model: nn.Module,
                device: torch.device, dtype: torch.dtype) -> set[str]:  # fmt: skip
    """Every tensor of one file into the model, checked against the index and the model's shapes."""
    loaded = set()
    with safe_open(shard, framework="pt", device="cpu") as f:
        file_keys = set(f.keys())
        for key in index_keys or []:
            if key not in file_keys:
                raise WeightsError(f"{shard}: the index puts tensor '{key}' here but the file lacks it")
        for key in sorted(file_keys):
            if key.endswith(IGNORED_SUFFIXES):
                continue
            if key not in expected:
                raise WeightsError(f"{shard}: unexpected tensor '{key}' (no such parameter in the model)")
            shape, want = list(f.get_slice(key).get_shape()), list(expected[key].shape)
            if shape != want:
                raise WeightsError(f"{shard}: tensor '{key}' has shape {shape}, expected {want}")
            _set_parameter(model, key, f.get_tensor(key).to(device=device, dtype=dtype))
            loaded.add(key)
    return loaded


def _set_parameter(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, param_name = key.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[param_name] = nn.Parameter(tensor, requires_grad=False)
