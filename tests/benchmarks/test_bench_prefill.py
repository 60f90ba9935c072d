"""The prefill benchmark's FLOP count is the matmul work the model does, and the script runs end
to end (the tiny architecture on CPU; the GPU runs the full-size ones)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_prefill import image, linear_flops, main
from benchmarks.full_size import DigitTokenizer, random_model
from model.generation import GenerationParams, generate_reference
from model.processor import Conversation, Processor


@pytest.mark.parametrize("with_image", [True, False])
@pytest.mark.parametrize("arch", ["tiny", "tiny2"])
def test_linear_flops_are_the_reference_prefills_matmuls(arch, with_image):
    """Counted by torch over the reference path's prefill: every mm/addmm (the linear layers, each
    row through one expert, the lm_head on the last row), and none of the attention's bmm."""
    model = random_model(arch, "cpu", torch.float32)
    picture = image(0, model.config.vision.image_size) if with_image else None
    prompt = Processor(DigitTokenizer(), model.config).build(Conversation(query="What is this?", image=picture))
    with FlopCounterMode(display=False) as counter:
        generate_reference(model, prompt, GenerationParams(max_tokens=1))
    counts = {str(op).split(".")[1]: flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert linear_flops(model, prompt) == counts.get("mm", 0) + counts.get("addmm", 0)


@pytest.mark.parametrize("rows", ["gathered", "grouped"])
def test_the_script_reports_both_cases(monkeypatch, capsys, rows):
    import model.cogvlm as cogvlm

    into_slots = []
    original = cogvlm.to_slots
    monkeypatch.setattr(cogvlm, "to_slots", lambda x, routing: into_slots.append(1) or original(x, routing))
    main(["--arch", "tiny", "--device", "cpu", "--images", "3", "--expert-rows", rows])
    out = capsys.readouterr().out
    assert f"{rows} expert rows" in out and bool(into_slots) == (rows == "grouped")
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 3"]
    for row in rows:
        share = float(row.split(" | ")[4])
        assert 0 < share < 1  # the vision tower ran, inside the time to first token
