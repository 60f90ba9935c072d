"""The evaluation's scoring: what counts as correct, and the breakdown by kind the model card quotes."""

from training.evaluate import breakdown, is_correct, kind_of
from training.shapes_dataset import Sample, Shape

RED_CIRCLE, BLUE_SQUARE = Shape("red", "circle", (0, 0, 28, 28)), Shape("blue", "square", (56, 56, 84, 84))


def sample(task: str, question: str, answer: str, shapes=(RED_CIRCLE, BLUE_SQUARE)) -> Sample:
    return Sample(None, shapes, task, {"caption": "chat", "vqa": "vqa", "grounding": "base"}[task], question, answer)


def test_grounding_is_correct_at_iou_one_half_and_short_answers_exactly():
    where = sample("grounding", "Where is the red circle?", "[[000,000,250,250]]")
    assert is_correct(where, "[[000,000,250,250]]") and is_correct(where, "[[010,010,250,250]]")
    assert not is_correct(where, "[[100,100,350,350]]")  # IoU 0.29
    assert not is_correct(where, "[[000,000,250]]") and not is_correct(where, "red")
    assert is_correct(sample("vqa", "What color is the circle?", "red"), " red ")
    assert not is_correct(sample("vqa", "What color is the circle?", "red"), "reddish")


def test_breakdown_counts_by_question_kind_and_shape_count():
    items = [
        sample("vqa", "What color is the circle?", "red"),
        sample("vqa", "Is the red circle left or right of the blue square?", "left"),
        sample("vqa", "How many shapes are there?", "2"),
        sample("grounding", "Where is the red circle?", "[[000,000,250,250]]"),
        sample("grounding", "Where is the red circle?", "[[000,000,250,250]]", (RED_CIRCLE,)),
        sample("caption", "Describe the image.", "a red circle and a blue square"),
    ]
    answers = ["red", "right", "2", "[[500,500,750,750]]", "[[000,000,250,250]]", "a red circle and a blue square"]
    assert kind_of(items[1]) == "vqa left/right" and kind_of(items[4]) == "grounding 1 shape"
    assert breakdown(items, answers) == {
        "caption 2 shapes": (1, 1),
        "grounding 1 shape": (1, 1),
        "grounding 2 shapes": (0, 1),
        "vqa colour": (1, 1),
        "vqa count": (1, 1),
        "vqa left/right": (0, 1),
    }
