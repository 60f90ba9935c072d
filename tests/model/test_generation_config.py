"""A checkpoint's generation_config.json as sampling defaults (vLLM's --generation-config auto)."""

import json

import pytest

from model.config import ConfigError
from model.generation_config import GenerationDefaults, load_generation_defaults

# what Llama-3 chat models such as CogVLM2 ship, with the keys we do not read
LLAMA3_STYLE = {"bos_token_id": 128000, "eos_token_id": [128001, 128009], "do_sample": True, "temperature": 0.6,
                "top_p": 0.9, "max_new_tokens": 2048, "transformers_version": "4.40.0"}  # fmt: skip


def write(folder, content) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "generation_config.json").write_text(content if isinstance(content, str) else json.dumps(content))


def test_auto_reads_the_checkpoint_folder_and_none_ignores_it(tmp_path):
    write(tmp_path, LLAMA3_STYLE)
    defaults = load_generation_defaults("auto", str(tmp_path))
    assert defaults == GenerationDefaults(temperature=0.6, top_p=0.9, max_tokens=2048)
    assert defaults.set_fields() == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 2048}
    for setting in ("none", "vllm"):
        assert load_generation_defaults(setting, str(tmp_path)) == GenerationDefaults()


def test_every_key_read_and_a_folder_given_instead(tmp_path):
    write(tmp_path / "other", {"temperature": 1, "top_p": 0.5, "top_k": 20, "min_p": 0.05,
                               "repetition_penalty": 1.1, "max_new_tokens": 7})  # fmt: skip
    defaults = load_generation_defaults(str(tmp_path / "other"), str(tmp_path))
    assert defaults == GenerationDefaults(temperature=1.0, top_p=0.5, top_k=20, min_p=0.05, repetition_penalty=1.1,
                                          max_tokens=7)  # fmt: skip
    assert isinstance(defaults.temperature, float)


def test_no_file_means_no_defaults_unless_a_folder_was_named(tmp_path):
    assert load_generation_defaults("auto", str(tmp_path)) == GenerationDefaults()  # CogVLM-17B has none
    with pytest.raises(ConfigError, match=r"generation_config\.json: not found"):
        load_generation_defaults(str(tmp_path / "missing"), str(tmp_path))


@pytest.mark.parametrize(
    "content, names",
    [
        ("{temperature: 0.6", "not valid JSON"),
        ("[0.6]", "must be a JSON object"),
        ({"temperature": "0.6"}, "'temperature' must be a number"),
        ({"top_k": 2.5}, "'top_k' must be an integer"),
        ({"do_sample": True, "top_p": 1.5}, "'top_p': top_p must be in"),
        ({"temperature": -1}, "'temperature': temperature must be"),
        ({"max_new_tokens": 0}, "'max_new_tokens': max_tokens must be"),
        ({"repetition_penalty": True}, "'repetition_penalty' must be a number"),
    ],
)
def test_a_broken_file_is_an_error_naming_file_and_key(tmp_path, content, names):
    write(tmp_path, content)
    with pytest.raises(ConfigError) as err:
        load_generation_defaults("auto", str(tmp_path))
    assert str(tmp_path / "generation_config.json") in str(err.value) and names in str(err.value)
