"""Random-weight CogVLM checkpoints small enough for CPU tests, written in the official HF
layout (config.json, sharded safetensors + index, tokenizer files), so the loader that reads
them is the one that reads the 35 GB checkpoints.

Generation 1 gets a sentencepiece BPE with byte fallback and LlamaTokenizer config (vicuna's
format); generation 2 a byte-level BPE tokenizer.json with Llama-3's special tokens.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import CogVLMConfig, VisionConfig

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|reserved_special_token_0|>")
TOKENIZER_VOCAB_SIZE = 512


def tokenizer_corpus() -> list[str]:
    """Words the tests and the demo use, so the tokenizer has merges for them."""
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    shapes = ["circle", "square", "triangle", "star", "cross", "diamond"]
    places = ["left", "right", "above", "below", "top", "bottom", "center"]
    lines = []
    for color, shape, place in itertools.product(colors, shapes, places):
        lines.append(f"Question: What is in the image? Answer: a {color} {shape} on the {place}.")
        lines.append(f"Question: Where is the {color} {shape}? Short answer: [[{len(color)}12,3{len(shape)}4,567,890]]")
        lines.append(f"Describe the picture. There are two shapes: a {shape} and a {color} one, {place}!")
    return lines


def write_sentencepiece_tokenizer(out: Path, corpus: list[str] | None = None, vocab_size: int = TOKENIZER_VOCAB_SIZE,
                                  split_digits: bool = False) -> int:  # fmt: skip
    """Vicuna's format: a sentencepiece BPE with byte fallback, <unk>/<s>/</s> = 0/1/2."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus or tokenizer_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        split_digits=split_digits,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        minloglevel=2,
        hard_vocab_limit=False,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()


def write_byte_level_tokenizer(out: Path) -> tuple[int, dict[str, int]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - len(LLAMA3_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer)
    tokenizer.add_special_tokens(list(LLAMA3_SPECIALS))
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": LLAMA3_SPECIALS[0],
        "eos_token": LLAMA3_SPECIALS[2],
        "pad_token": LLAMA3_SPECIALS[3],
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer.get_vocab_size(), {name: tokenizer.token_to_id(name) for name in LLAMA3_SPECIALS}


def tiny_config(generation: int, vocab_size: int, special_ids: dict[str, int] | None = None) -> CogVLMConfig:
    # 32 px / 4 px patches = 64 patches -> 66 image tokens
    vision = VisionConfig(image_size=32, patch_size=4, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    base = CogVLMConfig(generation=1, vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=4, vision=vision)  # fmt: skip
    if generation == 1:
        return base
    # 64 px / 4 px = 256 patches, 2x2 conv -> 64 -> 66 image tokens; GQA 4 q heads over 2 kv heads
    ids = special_ids or {}
    return replace(
        base, generation=2, intermediate_size=160, num_kv_heads=2, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=ids.get(LLAMA3_SPECIALS[0], 0),
        eos_token_ids=(ids.get(LLAMA3_SPECIALS[1], 1), ids.get(LLAMA3_SPECIALS[2], 2)),
        pad_token_id=ids.get(LLAMA3_SPECIALS[3], 3), vision_qkv_bias=True,
        vision=replace(vision, image_size=64, has_conv=True),
    )  # fmt: skip


def random_state_dict(cfg: CogVLMConfig, seed: int) -> dict[str, torch.Tensor]:
    """Weights scaled by 1/sqrt(fan_in), so activations keep their size through the layers and
    the logits are spread out (no near-ties that rounding could flip between paths)."""
    from model.cogvlm import CogVLMForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CogVLMForCausalLM(cfg).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sorted(shapes.items()):
        if key.endswith("layernorm.weight") or key.endswith("norm.weight") or key.endswith("norm1.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1 or key.endswith(("boi", "eoi", "cls_embedding")):
            tensor = 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:])
            scale = 1.0 if "embed" in key else (4.0 if key == "lm_head.weight" else 1.0) / math.sqrt(fan_in)
            tensor = scale * torch.randn(shape, generator=generator)
        state[key] = tensor
    return state


def save_sharded(state: dict[str, torch.Tensor], out: Path, num_shards: int) -> None:
    keys = sorted(state)
    per_shard = math.ceil(len(keys) / num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {k: state[k].contiguous() for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(chunk, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
        total += sum(t.numel() * t.element_size() for t in chunk.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_checkpoint(
    out_dir: str | Path,
    generation: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    num_shards: int = 3,
) -> CogVLMConfig:
    if generation not in (1, 2):
        raise ValueError(f"generation must be 1 or 2, got {generation}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if generation == 1:
        cfg = tiny_config(1, write_sentencepiece_tokenizer(out))
    else:
        cfg = tiny_config(2, *write_byte_level_tokenizer(out))
    dtype_name = str(dtype).removeprefix("torch.")
    cfg = replace(cfg, torch_dtype=dtype_name)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    state = {k: v.to(dtype) for k, v in random_state_dict(cfg, seed).items()}
    if num_shards > 1:
        save_sharded(state, out, num_shards)
    else:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return cfg
