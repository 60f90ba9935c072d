"""Full-size configs built on the meta device must produce exactly the checkpoint names and
shapes of COGVLM.md section 2. The expected lists are written from the document, not the code."""

import json

import pytest
import torch

from model.cogvlm import CogVLMForCausalLM
from model.config import CogVLMConfig, ConfigError, cogvlm2_19b_config, cogvlm_17b_config


def expected_keys(generation: int) -> dict[str, tuple[int, ...]]:
    hidden, vision_hidden, vision_mlp = 4096, 1792, 15360
    if generation == 1:
        vocab, inter, qkv, positions = 32000, 11008, 12288, 1226  # image 490: (490/14)^2 + 1
    else:
        vocab, inter, qkv, positions = 128256, 14336, 6144, 9217  # image 1344: (1344/14)^2 + 1
    keys = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for layer in range(32):
        p = f"model.layers.{layer}."
        keys[p + "input_layernorm.weight"] = (hidden,)
        keys[p + "post_attention_layernorm.weight"] = (hidden,)
        for expert in ("language", "vision"):
            keys[p + f"self_attn.{expert}_expert_query_key_value.weight"] = (qkv, hidden)
            keys[p + f"self_attn.{expert}_expert_dense.weight"] = (hidden, hidden)
            keys[p + f"mlp.{expert}_mlp.gate_proj.weight"] = (inter, hidden)
            keys[p + f"mlp.{expert}_mlp.up_proj.weight"] = (inter, hidden)
            keys[p + f"mlp.{expert}_mlp.down_proj.weight"] = (hidden, inter)
        if generation == 2:
            keys[p + "self_attn.vision_expert_query_key_value.bias"] = (qkv,)
    v = "model.vision."
    keys[v + "patch_embedding.proj.weight"] = (vision_hidden, 3, 14, 14)
    keys[v + "patch_embedding.proj.bias"] = (vision_hidden,)
    keys[v + "patch_embedding.cls_embedding"] = (1, vision_hidden)
    keys[v + "patch_embedding.position_embedding.weight"] = (positions, vision_hidden)
    for layer in range(63):
        p = f"{v}transformer.layers.{layer}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            keys[p + f"{norm}.weight"] = (vision_hidden,)
            keys[p + f"{norm}.bias"] = (vision_hidden,)
        keys[p + "attention.query_key_value.weight"] = (3 * vision_hidden, vision_hidden)
        keys[p + "attention.query_key_value.bias"] = (3 * vision_hidden,)
        keys[p + "attention.dense.weight"] = (vision_hidden, vision_hidden)
        keys[p + "attention.dense.bias"] = (vision_hidden,)
        keys[p + "mlp.fc1.weight"] = (vision_mlp, vision_hidden)
        keys[p + "mlp.fc1.bias"] = (vision_mlp,)
        keys[p + "mlp.fc2.weight"] = (vision_hidden, vision_mlp)
        keys[p + "mlp.fc2.bias"] = (vision_hidden,)
    a = v + "linear_proj."
    keys[a + "linear_proj.weight"] = (hidden, vision_hidden)
    keys[a + "gate_proj.weight"] = (inter, hidden)
    keys[a + "dense_h_to_4h.weight"] = (inter, hidden)
    keys[a + "dense_4h_to_h.weight"] = (hidden, inter)
    keys[a + "norm1.weight"] = (hidden,)
    keys[a + "norm1.bias"] = (hidden,)
    keys[v + "boi"] = (1, 1, hidden)
    keys[v + "eoi"] = (1, 1, hidden)
    if generation == 2:
        keys[v + "conv.weight"] = (vision_hidden, vision_hidden, 2, 2)
        keys[v + "conv.bias"] = (vision_hidden,)
    return keys


@pytest.mark.parametrize("generation", [1, 2])
def test_full_size_model_has_exactly_the_checkpoint_keys(generation):
    cfg = cogvlm_17b_config() if generation == 1 else cogvlm2_19b_config()
    with torch.device("meta"):
        model = CogVLMForCausalLM(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_keys(generation)
    assert sorted(set(got) - set(want)) == []
    assert sorted(set(want) - set(got)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}


def test_full_size_facts():
    v1, v2 = cogvlm_17b_config(), cogvlm2_19b_config()
    assert (v1.num_image_tokens, v2.num_image_tokens) == (1227, 2306)
    assert (v1.rope_theta, v2.rope_theta) == (10000.0, 500000.0)
    assert (v1.qkv_size, v2.qkv_size) == (12288, 6144)
    assert v2.eos_token_ids == (128001, 128009)


def official_config_json(generation: int) -> dict:
    """config.json as the official repos ship it (v2 without num_multi_query_heads)."""
    raw = {
        "architectures": ["CogVLMForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "max_position_embeddings": 2048,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "rms_norm_eps": 1e-05,
        "template_version": "chat",
        "vocab_size": 32000,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "hidden_act": "gelu",
            "hidden_size": 1792,
            "image_size": 490,
            "in_channels": 3,
            "intermediate_size": 15360,
            "layer_norm_eps": 1e-06,
            "num_heads": 16,
            "num_hidden_layers": 63,
            "num_positions": 1226,
            "patch_size": 14,
        },
    }
    if generation == 2:
        raw.update(
            vocab_size=128256,
            intermediate_size=14336,
            max_position_embeddings=8192,
            bos_token_id=128000,
            eos_token_id=[128001, 128009],
            pad_token_id=128002,
        )
        raw["vision_config"] = {**raw["vision_config"], "image_size": 1344, "num_positions": 9217}
    return raw


def test_generation_detected_and_hidden_facts_filled_in():
    v1 = CogVLMConfig.from_dict(official_config_json(1))
    v2 = CogVLMConfig.from_dict(official_config_json(2))
    assert v1 == cogvlm_17b_config()
    assert v2 == cogvlm2_19b_config()
    assert v2.num_kv_heads == 8 and v2.vision_qkv_bias and v2.vision.has_conv
    assert v1.num_kv_heads == 32 and not v1.vision_qkv_bias and not v1.vision.has_conv


def test_explicit_num_multi_query_heads_wins():
    raw = {**official_config_json(2), "num_multi_query_heads": 4}
    assert CogVLMConfig.from_dict(raw).num_kv_heads == 4


@pytest.mark.parametrize(
    "change, words",
    [
        ({"architectures": ["LlamaForCausalLM"]}, ["architectures", "LlamaForCausalLM"]),
        ({"architectures": ["CogAgentForCausalLM"]}, ["architectures", "CogAgent"]),
        ({"vision_config": None}, ["vision_config"]),
        ({"hidden_size": None}, ["hidden_size"]),
    ],
)
def test_config_that_is_neither_generation_is_refused(tmp_path, change, words):
    raw = {**official_config_json(1), **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        CogVLMConfig.from_checkpoint(tmp_path)
    for word in [str(tmp_path / "config.json"), *words]:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "key, value",
    [("hidden_size", "big"), ("hidden_size", "4096"), ("num_hidden_layers", 32.5), ("vocab_size", True),
     ("eos_token_id", "</s>"), ("rms_norm_eps", "1e-5"), ("template_version", 1)],
)  # fmt: skip
def test_a_value_of_the_wrong_type_names_its_key(tmp_path, key, value):
    """hidden_size "big" was once `invalid literal for int() with base 10: 'big'`, no file or key."""
    (tmp_path / "config.json").write_text(json.dumps({**official_config_json(1), key: value}))
    with pytest.raises(ConfigError, match=f"config.json: key '{key}' must be") as err:
        CogVLMConfig.from_checkpoint(tmp_path)
    assert repr(value) in str(err.value)


def test_inconsistent_num_positions_is_refused():
    raw = official_config_json(1)
    raw["vision_config"] = {**raw["vision_config"], "num_positions": 1000}
    with pytest.raises(ConfigError, match="num_positions"):
        CogVLMConfig.from_dict(raw)


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        CogVLMConfig.from_checkpoint(tmp_path)


def test_tiny_config_round_trips(tiny_checkpoints):
    for generation, folder in tiny_checkpoints.items():
        cfg = CogVLMConfig.from_checkpoint(folder)
        assert cfg.generation == generation
        assert CogVLMConfig.from_dict(cfg.to_dict()) == cfg
