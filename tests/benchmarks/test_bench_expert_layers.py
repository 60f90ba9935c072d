"""The layer benchmark runs end to end (the tiny architectures on CPU; the GPU runs the full-size
ones): its four ways give the same layers' output, and its steps are the ones it names."""

import json

import pytest
import torch

import model.cogvlm as cogvlm
from benchmarks.bench_expert_layers import STEP_BUDGET, main, steps
from benchmarks.kernels.bench_expert_linear import TEXT_TOKENS


def test_the_steps_are_one_image_a_budget_step_and_four_images():
    masks = steps(1227, "cpu")
    one, budget, four = masks.values()
    assert one.shape == (1227 + TEXT_TOKENS,) and int(one.sum()) == 1226  # boi and the patches; eoi is text
    assert budget.shape == (STEP_BUDGET,) and torch.equal(budget[: one.shape[0]], one)
    assert torch.equal(budget[one.shape[0] :], one[: STEP_BUDGET - one.shape[0]])  # the next request's first rows
    assert torch.equal(four, one.repeat(4))


@pytest.mark.parametrize("arch", ["tiny", "tiny2"])
def test_the_script_runs_and_its_ways_agree(monkeypatch, tmp_path, capsys, arch):
    into_slots = []
    original = cogvlm.to_slots
    monkeypatch.setattr(cogvlm, "to_slots", lambda x, routing: into_slots.append(x.shape[0]) or original(x, routing))
    out = tmp_path / "layers.json"
    main(["--arch", arch, "--device", "cpu", "--layers", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["step"] for r in rows] == list(steps(1, "cpu"))
    # on CPU every way runs the torch references, over batch order or slot order: the same numbers
    assert all(r["gathered_err"] == 0.0 and r["grouped_err"] == 0.0 for r in rows)
    assert all(r[f"{m}_ms"] > 0 for r in rows for m in ("dense", "gathered", "grouped", "peers", "gathers"))
    assert sorted(set(into_slots)) == sorted(r["rows"] for r in rows)  # the grouped way entered slot order
    assert "geomean of the layers' time against dense" in capsys.readouterr().out
