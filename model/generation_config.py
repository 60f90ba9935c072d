"""Sampling defaults from a checkpoint's generation_config.json, as vLLM's `--generation-config auto`.

A model's authors put their recommended sampling there (Llama-3-8B-Instruct, CogVLM2's language
model, ships temperature 0.6 and top_p 0.9). vLLM applies those values to every request that
leaves the field unset, and so do we: a request's own value always wins, and without a file (or
with `--generation-config none`) the OpenAI defaults hold (temperature 1, top_p 1, no top_k,
min_p or repetition penalty, max_tokens up to the context). As in vLLM, `do_sample` and
`max_length` (which counts the prompt) are not read: a file that sets a temperature gets it.
Only these keys are read:

    temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens (-> max_tokens)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from model.config import ConfigError, read_key
from model.sampling_params import ParamError, SamplingParams

FILE_NAME = "generation_config.json"
# each default's key in generation_config.json, and its JSON type
HF_KEYS = {"temperature": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
           "min_p": ("min_p", float), "repetition_penalty": ("repetition_penalty", float),
           "max_tokens": ("max_new_tokens", int)}  # fmt: skip


@dataclass(frozen=True)
class GenerationDefaults:
    """What a request that leaves a sampling field unset gets; None: the OpenAI default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # the file's max_new_tokens

    def set_fields(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def load_generation_defaults(setting: str, model_folder: str) -> GenerationDefaults:
    """setting: 'auto' (the model folder's generation_config.json, if it has one), 'none' (or
    vLLM's 'vllm': no defaults), or a folder holding a generation_config.json. A file that is not
    JSON, a key of the wrong type, or a value no request could set is an error naming file and key."""
    if setting in ("none", "vllm"):
        return GenerationDefaults()
    folder = Path(model_folder if setting == "auto" else setting)
    file = folder / FILE_NAME
    if not file.is_file():
        if setting == "auto":
            return GenerationDefaults()  # most CogVLM-17B checkpoints have none
        raise ConfigError(f"{file}: not found; --generation-config must be auto, none or a folder with {FILE_NAME}")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: must be a JSON object, got {type(raw).__name__}")
    defaults = GenerationDefaults(**{name: read_key(str(file), raw, key, kind, default=None)
                                     for name, (key, kind) in HF_KEYS.items()})  # fmt: skip
    try:  # the ranges a request is held to
        SamplingParams(**defaults.set_fields())
    except ParamError as err:
        raise ConfigError(f"{file}: key '{HF_KEYS.get(err.field, (err.field,))[0]}': {err}") from err
    return defaults
