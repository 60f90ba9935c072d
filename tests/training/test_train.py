"""The training script: the per-patch targets say what each patch shows, and a few steps write a
checkpoint the server's loader takes as it is (the training-only heads left out)."""

import json
import random

import torch

from model.weights import load_model
from training.shapes_dataset import Shape, make_sample, vqa_pairs
from training.train import (
    PatchHeads,
    SubjectHeads,
    TrainConfig,
    covered_patches,
    patch_targets,
    subject_targets,
    train,
)


def test_patch_targets_mark_the_patches_whose_centre_is_inside_each_box():
    # 14 px patches: centres at 7, 21, 35, ...; the box [14, 28) x [0, 42) holds column 1, rows 0-2
    red_square = Shape("red", "square", (14, 0, 28, 42))
    blue_circle = Shape("blue", "circle", (80, 80, 112, 112))  # centres 91 and 105: columns and rows 6, 7
    targets = patch_targets((red_square, blue_circle))
    grid = targets.color.view(8, 8)
    assert grid[0:3, 1].tolist() == [1, 1, 1] and grid[3, 1] == 0 and grid[0, 0] == 0 and grid[0, 2] == 0
    assert (grid[6:, 6:] == 3).all()  # 1 + index of blue in COLORS
    assert int((targets.color > 0).sum()) == 3 + 4
    assert targets.kind.view(8, 8)[0, 1] == 2 and targets.kind.view(8, 8)[7, 7] == 1  # square, circle
    assert torch.allclose(targets.box[1], torch.tensor([14, 0, 28, 42]) / 112)
    assert torch.equal(targets.box[0], torch.zeros(4))
    assert covered_patches(blue_circle, 8).sum() == 4


def test_patch_heads_loss_rewards_features_that_encode_the_targets():
    targets = patch_targets((Shape("green", "triangle", (30, 30, 60, 60)),))
    assert targets.digits[targets.color > 0][0].tolist() == [2, 6, 8, 2, 6, 8, 5, 3, 6, 5, 3, 6]  # [[268,268,536,536]]
    heads = PatchHeads(160)

    class Item:
        patches = targets

    random_loss = heads.loss(torch.randn(1, 64, 160), [Item()])
    # features that spell the targets out (colour at 0.., shape at 8.., digit j = d at 20 + 10 j + d)
    # and heads that read them
    rows, foreground = torch.arange(64), targets.color > 0
    features = torch.zeros(1, 64, 160)
    features[0, rows, targets.color] = 10.0
    features[0, rows, 8 + targets.kind] = 10.0
    for j in range(12):
        features[0, rows[foreground], 20 + 10 * j + targets.digits[foreground, j]] = 10.0
    with torch.no_grad():
        for head in (heads.color, heads.kind, heads.digits, heads.box):
            head.weight.zero_(), head.bias.zero_()
        heads.color.weight[torch.arange(7), torch.arange(7)] = 1.0
        heads.kind.weight[torch.arange(4), 8 + torch.arange(4)] = 1.0
        heads.digits.weight[torch.arange(120), 20 + torch.arange(120)] = 1.0
        heads.box.bias.copy_(torch.tensor([30, 30, 60, 60]) / 112)
    assert heads.loss(features, [Item()]) < 0.01 < random_loss


def test_questions_name_their_subjects_in_order():
    red_circle, blue_square = Shape("red", "circle", (0, 0, 30, 30)), Shape("blue", "square", (60, 60, 90, 90))
    pairs = {q: (a, subjects) for q, a, subjects in vqa_pairs((red_circle, blue_square))}
    assert pairs["How many shapes are there?"] == ("2", ())
    assert pairs["What color is the square?"] == ("blue", (blue_square,))
    assert pairs["Is the blue square left or right of the red circle?"] == ("right", (blue_square, red_circle))
    assert make_sample(random.Random(5), "caption").subjects == ()
    grounding = make_sample(random.Random(3), "grounding")
    assert grounding.answer.startswith("[[") and len(grounding.subjects) == 1
    assert grounding.subjects[0].name in grounding.question


def test_subject_heads_ask_for_the_named_boxes_at_every_answer_position():
    heads = SubjectHeads(32)
    shape = Shape("green", "triangle", (30, 30, 60, 60))  # [[268,268,536,536]]

    class Item:
        input_ids = list(range(10))
        loss_from = 7  # rows 6, 7, 8 predict answer tokens
        subjects = subject_targets((shape,))

    class NoSubject(Item):
        subjects = subject_targets(())

    targets = Item.subjects
    assert targets.present.tolist() == [True, False] and targets.digits[0].tolist()[:3] == [2, 6, 8]
    assert (targets.digits[1:] == -100).all()
    # heads whose biases alone answer the named shape's box and digits: near-zero
    # loss; row 6 of the second sequence (no subject) then holds nonsense the loss must ignore
    hidden = torch.zeros(2 * 10, 32)
    with torch.no_grad():
        for head in (heads.box, heads.digits):
            head.weight.zero_(), head.bias.zero_()
        heads.box.bias[:4] = targets.box[0]
        for j, digit in enumerate(targets.digits[0].tolist()):
            heads.digits.bias[10 * j + digit] = 20.0
    good = heads.loss(hidden, [Item(), NoSubject()], 10)
    hidden[10 + 6] = 100.0
    assert heads.loss(hidden, [Item(), NoSubject()], 10) == good < 0.01
    hidden[6] = 1.0  # an answer row of the first sequence drifts: the loss sees it
    heads.box.weight.data[:4, 0] = 1.0
    assert heads.loss(hidden, [Item(), NoSubject()], 10) > good + 0.1
    assert heads.loss(hidden, [NoSubject()], 10) == 0


def test_a_few_training_steps_write_a_checkpoint_the_loader_takes(tmp_path):
    out = train(TrainConfig(out=str(tmp_path), steps=3, batch_size=4, threads=1, eval_per_task=1))
    model = load_model(out, torch.float32)  # strict: an unknown key (a training head) would fail here
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 3 and log["final_aux_loss"] > 0 and log["final_subject_loss"] > 0
    assert set(log["held_out_reference"]) == {"caption", "vqa", "grounding"}
    assert (out / "loss_curve.png").stat().st_size > 0
