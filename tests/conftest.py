import os
import random

import pytest
import torch

# NOTE: set before any kernel module imports triton. Without CUDA the Triton kernels run in
# the interpreter (where bf16 arithmetic is wrong: kernel tests use fp32/fp16 there); with
# CUDA they are compiled, as in production.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check results, not speed: one kernel config per shape instead of autotuning eight
# (tests/kernels covers every config once).
os.environ.setdefault("COGSERVE_AUTOTUNE", "0")

torch.set_num_threads(1)  # the other core may be busy; CPU tests are sized for one


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{generation: folder} of random-weight tiny checkpoints in the official layout."""
    from model.tiny_checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {g: _write(write_tiny_checkpoint, root / f"gen{g}", g) for g in (1, 2)}


def _write(writer, path, generation):
    writer(path, generation)
    return path


@pytest.fixture(scope="session", params=[1, 2], ids=["cogvlm", "cogvlm2"])
def tiny_checkpoint(request, tiny_checkpoints):
    return tiny_checkpoints[request.param]
