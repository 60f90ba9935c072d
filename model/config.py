"""One config type for both CogVLM generations, read from a checkpoint's config.json.

config.json does not say everything: the RoPE theta is hard-coded in each generation's
reference code (10000 vs 500000), CogVLM2's `num_multi_query_heads` is a class default of 8
that its config.json often omits, and only CogVLM2 has a bias on the vision-expert QKV.
Those facts live here, keyed by the detected generation (COGVLM.md section 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The architectures entry every official CogVLM / CogVLM2 checkpoint carries.
COGVLM_ARCHITECTURE = "CogVLMForCausalLM"
_REQUIRED = object()  # read()'s default: the key must be present
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}
LLAMA3_VOCAB_SIZE = 128256
LLAMA3_BOS_TOKEN_ID = 128000


class ConfigError(ValueError):
    """A config.json that is not a CogVLM checkpoint we can run; the message names file and key."""


def read_key(source: str, d: dict, key: str, kind: type = int, where: str = "", default=_REQUIRED):
    """d[key] as an int, float or str; a missing required key, or a value of another JSON type (a
    string "4096", a bool, 1.5 for an int), is an error naming the file (`source`) and the key."""
    if key not in d:
        if default is _REQUIRED:
            raise ConfigError(f"{source}: required key '{where}{key}' is missing")
        return default
    value = d[key]
    allowed = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ConfigError(f"{source}: key '{where}{key}' must be {_KIND_NAMES[kind]}, got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class VisionConfig:
    """EVA2-CLIP-E tower (COGVLM.md section 6)."""

    image_size: int = 490  # input is resized to image_size x image_size
    patch_size: int = 14
    in_channels: int = 3
    hidden_size: int = 1792
    num_layers: int = 63
    num_heads: int = 16
    intermediate_size: int = 15360
    layer_norm_eps: float = 1e-6
    has_conv: bool = False  # CogVLM2: 2x2 stride-2 conv after the tower

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1  # patches + cls

    @property
    def num_patches_out(self) -> int:
        """Patches handed to the language model, after the optional 2x2 conv."""
        grid = self.grid_size // 2 if self.has_conv else self.grid_size
        return grid * grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class CogVLMConfig:
    generation: int = 1  # 1: CogVLM-17B (Vicuna-7B), 2: CogVLM2 (Llama-3-8B)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # language MLP and the vision GLU adapter
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32  # v2: num_multi_query_heads (8 when config.json omits it)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    bos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 0
    template_version: str = "chat"
    vision_qkv_bias: bool = False  # v2 only: bias on vision_expert_query_key_value
    torch_dtype: str = "bfloat16"  # the dtype the checkpoint was saved in
    vision: VisionConfig = VisionConfig()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def qkv_size(self) -> int:
        """Rows of the fused [Q | K | V] projection."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def num_image_tokens(self) -> int:
        """Slots one image takes in the sequence: boi + patches + eoi (1227 v1, 2306 v2)."""
        return self.vision.num_patches_out + 2

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> CogVLMConfig:
        archs = raw.get("architectures") or []
        if COGVLM_ARCHITECTURE not in archs:
            raise ConfigError(
                f"{source}: key 'architectures' is {archs!r}; expected {COGVLM_ARCHITECTURE!r}. "
                "Only CogVLM-17B and CogVLM2 checkpoints are supported (not CogAgent or GLM-4V)."
            )
        vision_raw = raw.get("vision_config")
        if not isinstance(vision_raw, dict):
            raise ConfigError(f"{source}: key 'vision_config' is missing; not a CogVLM checkpoint")

        def read(d: dict, key: str, kind: type = int, where: str = "", default=_REQUIRED):
            return read_key(source, d, key, kind, where, default)

        generation = detect_generation(raw)
        v = "vision_config."
        vision = VisionConfig(
            image_size=read(vision_raw, "image_size", where=v),
            patch_size=read(vision_raw, "patch_size", where=v),
            in_channels=read(vision_raw, "in_channels", where=v, default=3),
            hidden_size=read(vision_raw, "hidden_size", where=v),
            num_layers=read(vision_raw, "num_hidden_layers", where=v),
            num_heads=read(vision_raw, "num_heads", where=v),
            intermediate_size=read(vision_raw, "intermediate_size", where=v),
            layer_norm_eps=read(vision_raw, "layer_norm_eps", float, where=v, default=1e-6),
            has_conv=generation == 2,
        )
        declared = read(vision_raw, "num_positions", where=v, default=None)
        if declared is not None and declared != vision.num_positions:
            raise ConfigError(
                f"{source}: vision_config.num_positions is {declared} but image_size "
                f"{vision.image_size} / patch_size {vision.patch_size} gives {vision.num_positions}"
            )
        if vision.has_conv and vision.grid_size % 2:
            raise ConfigError(f"{source}: CogVLM2 needs an even patch grid, got {vision.grid_size}")

        num_heads = read(raw, "num_attention_heads")
        if "eos_token_id" not in raw:
            raise ConfigError(f"{source}: required key 'eos_token_id' is missing")
        eos = raw["eos_token_id"]
        eos_list = eos if isinstance(eos, list) else [eos]
        if not eos_list or any(isinstance(e, bool) or not isinstance(e, int) for e in eos_list):
            raise ConfigError(f"{source}: key 'eos_token_id' must be a token id or a list of them, got {eos!r}")
        cfg = cls(
            generation=generation,
            vocab_size=read(raw, "vocab_size"),
            hidden_size=read(raw, "hidden_size"),
            intermediate_size=read(raw, "intermediate_size"),
            num_layers=read(raw, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=read(raw, "num_multi_query_heads", default=8) if generation == 2 else num_heads,
            rms_norm_eps=read(raw, "rms_norm_eps", float, default=1e-5),
            rope_theta=500000.0 if generation == 2 else 10000.0,
            max_position_embeddings=read(raw, "max_position_embeddings", default=8192 if generation == 2 else 2048),
            bos_token_id=read(raw, "bos_token_id"),
            eos_token_ids=tuple(eos_list),
            pad_token_id=read(raw, "pad_token_id", default=128002 if generation == 2 else 0),
            template_version=read(raw, "template_version", str, default="chat"),
            vision_qkv_bias=generation == 2,
            torch_dtype=read(raw, "torch_dtype", str, default="bfloat16"),
            vision=vision,
        )
        cfg.validate(source)
        return cfg

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> CogVLMConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"{file}: not found; --model must be a checkpoint folder with config.json")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{file}: not valid JSON ({err})") from err
        return cls.from_dict(raw, source=str(file))

    def validate(self, source: str = "config") -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{source}: hidden_size {self.hidden_size} not divisible by heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads {self.num_heads} is not a multiple of "
                f"num_multi_query_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.vision.hidden_size % self.vision.num_heads:
            raise ConfigError(f"{source}: vision_config.hidden_size not divisible by vision_config.num_heads")
        if self.template_version not in ("chat", "vqa", "base"):
            raise ConfigError(f"{source}: template_version {self.template_version!r} is not chat, vqa or base")

    def to_dict(self) -> dict:
        """The config.json an official checkpoint of this generation would carry."""
        raw = {
            "architectures": [COGVLM_ARCHITECTURE],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "template_version": self.template_version,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": False,
            "torch_dtype": self.torch_dtype,
            "vision_config": {
                "image_size": self.vision.image_size,
                "patch_size": self.vision.patch_size,
                "in_channels": self.vision.in_channels,
                "hidden_size": self.vision.hidden_size,
                "num_hidden_layers": self.vision.num_layers,
                "num_heads": self.vision.num_heads,
                "intermediate_size": self.vision.intermediate_size,
                "layer_norm_eps": self.vision.layer_norm_eps,
                "num_positions": self.vision.num_positions,
                "hidden_act": "gelu",
                "dropout_prob": 0.0,
            },
        }
        if self.generation == 2:
            raw["num_multi_query_heads"] = self.num_kv_heads
        return raw


def detect_generation(raw: dict) -> int:
    """CogVLM2 is the Llama-3 one: it alone has GQA (`num_multi_query_heads`) and the Llama-3
    vocabulary / BOS; everything else with the CogVLM architecture is generation 1."""
    if "num_multi_query_heads" in raw:
        return 2
    if raw.get("vocab_size") == LLAMA3_VOCAB_SIZE or raw.get("bos_token_id") == LLAMA3_BOS_TOKEN_ID:
        return 2
    return 1


def cogvlm_17b_config() -> CogVLMConfig:
    """THUDM/cogvlm-chat-hf, as its config.json reads."""
    return CogVLMConfig()


def cogvlm2_19b_config() -> CogVLMConfig:
    """THUDM/cogvlm2-llama3-chat-19B, as its config.json reads."""
    return CogVLMConfig(
        generation=2,
        vocab_size=LLAMA3_VOCAB_SIZE,
        intermediate_size=14336,
        num_kv_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=LLAMA3_BOS_TOKEN_ID,
        eos_token_ids=(128001, 128009),
        pad_token_id=128002,
        vision_qkv_bias=True,
        vision=VisionConfig(image_size=1344, has_conv=True),
    )
