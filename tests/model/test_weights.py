import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.tiny_checkpoint import write_tiny_checkpoint
from model.weights import WeightsError, load_model


@pytest.fixture
def checkpoint(tmp_path):
    write_tiny_checkpoint(tmp_path / "ckpt", generation=2, num_shards=3)  # bf16 on disk
    return tmp_path / "ckpt"


def disk_tensors(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_sharded_bf16_checkpoint_loads_as_fp32(checkpoint):
    model = load_model(checkpoint, torch.float32)
    on_disk = disk_tensors(checkpoint)
    assert len(list(checkpoint.glob("model-*.safetensors"))) == 3
    for key, param in model.state_dict().items():
        assert param.dtype == torch.float32 and param.device.type == "cpu"
        assert torch.equal(param, on_disk[key].float()), key


def test_single_file_checkpoint_loads(tmp_path):
    write_tiny_checkpoint(tmp_path, generation=1, num_shards=1)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path, torch.bfloat16)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert set(model.state_dict()) == set(on_disk)
    assert all(torch.equal(p, on_disk[k]) for k, p in model.state_dict().items())


def rewrite_shard(checkpoint, edit):
    """Apply edit(tensors) to the shard holding lm_head.weight; returns that shard's path."""
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = checkpoint / index["weight_map"]["lm_head.weight"]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    return shard


def test_missing_tensor_names_key_and_file(checkpoint):
    shard = rewrite_shard(checkpoint, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(WeightsError) as err:
        load_model(checkpoint)
    assert "lm_head.weight" in str(err.value) and str(shard) in str(err.value)


def test_missing_tensor_without_index_entry_is_reported(checkpoint):
    index_file = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"].pop("lm_head.weight")
    index_file.write_text(json.dumps(index))
    for shard in checkpoint.glob("model-*.safetensors"):  # drop it from whichever shard has it
        with safe_open(shard, "pt") as f:
            has_it = "lm_head.weight" in f.keys()  # noqa: SIM118 (safe_open is no dict)
        if has_it:
            save_file({k: v for k, v in load_file(shard).items() if k != "lm_head.weight"}, shard)
    with pytest.raises(WeightsError, match=r"model.safetensors.index.json: missing tensor 'lm_head.weight'"):
        load_model(checkpoint)


def test_wrong_shape_names_key_file_and_shapes(checkpoint):
    shard = rewrite_shard(checkpoint, lambda t: t.update({"lm_head.weight": t["lm_head.weight"][:-1].clone()}))
    with pytest.raises(WeightsError) as err:
        load_model(checkpoint)
    message = str(err.value)
    assert "lm_head.weight" in message and str(shard) in message and "expected [426, 64]" in message


def test_unexpected_tensor_names_key_and_file(checkpoint):
    shard = rewrite_shard(checkpoint, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(WeightsError, match=r"unexpected tensor 'model.extra.weight'") as err:
        load_model(checkpoint)
    assert str(shard) in str(err.value)


def test_rotary_inv_freq_buffers_are_ignored(checkpoint):
    rewrite_shard(checkpoint, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(checkpoint)


def test_no_weights_at_all_is_a_clear_error(tmp_path, checkpoint):
    target = tmp_path / "empty"
    target.mkdir()
    shutil.copy(checkpoint / "config.json", target / "config.json")
    with pytest.raises(WeightsError, match="neither model.safetensors.index.json nor model.safetensors"):
        load_model(target)


def test_index_naming_a_missing_shard_is_a_clear_error(checkpoint):
    (checkpoint / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00002-of-00003.safetensors"):
        load_model(checkpoint)


@pytest.mark.parametrize("keep", [100, -1000])  # cut inside the header; cut inside the last tensor's bytes
def test_a_cut_short_shard_names_the_file(checkpoint, keep):
    shard = checkpoint / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:keep])
    with pytest.raises(WeightsError, match="model-00002-of-00003.safetensors: not a readable safetensors file"):
        load_model(checkpoint)
