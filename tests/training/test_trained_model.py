"""The embedded default model answers through the HTTP server: short answers and grounding boxes
on held-out slices (at what it measured, less a margin; see its model card), and the README's
examples (the second under a guided_choice). Its answers fall to chance if anything in the stack computes wrongly."""

import re
from pathlib import Path

import openai
import pytest
from PIL import Image

from server.config import DEFAULT_MODEL, ServeConfig
from tests.server.live_server import MODEL_NAME, running_engine, serve
from training.evaluate import HELD_OUT_SEED, ask_server, is_correct, png_data_uri
from training.shapes_dataset import Sample, samples

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / DEFAULT_MODEL


@pytest.fixture(scope="module")
def client():
    with (
        running_engine(MODEL_DIR, num_kv_blocks=256) as (_, processor, engine),
        serve(ServeConfig(), engine, processor) as live,
    ):
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def test_short_answers_through_the_server(client):
    """Issue 7's target is 90%; measured on 500 held-out questions: 91.6% (this slice of 50: see
    the assertion message). Chance is about 35%."""
    items = samples(HELD_OUT_SEED + 1, 50, "vqa")
    correct = sum(is_correct(s, ask_server(client, MODEL_NAME, s)) for s in items)
    assert correct / len(items) >= 0.8, f"{correct}/{len(items)}"


def test_grounding_through_the_server(client):
    """Boxes with IoU >= 0.5. Issue 7's target is 80%; measured on 500 held-out samples: 92.4%
    (a shape alone 147/147, among two or three shapes 315/353). The multi-shape slice is asserted
    apart: picking the named shape is what a weaker model gets wrong (the previous one: 15/72)."""
    items = samples(HELD_OUT_SEED + 2, 60, "grounding")
    correct = [is_correct(s, ask_server(client, MODEL_NAME, s)) for s in items]
    several = [ok for s, ok in zip(items, correct, strict=True) if len(s.shapes) > 1]
    assert sum(correct) / len(items) >= 0.75, f"{sum(correct)}/{len(items)}"
    assert sum(several) / len(several) >= 0.7, f"{sum(several)}/{len(several)} with several shapes"


def test_readme_first_example_is_answered_correctly(client):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"<!-- example: (\S+) \| (.+?) \| (\w+) \| (.+?) -->", readme)
    assert example, "README lost its first example"
    image_path, question, template, answer = example.groups()
    sample = Sample(Image.open(ROOT / image_path).convert("RGB"), (), "vqa", template, question, answer)
    assert ask_server(client, MODEL_NAME, sample).strip() == answer


def test_readme_choice_example_keeps_the_models_answer(client):
    """Structured output on a trained model: the README's guided_choice request answers what the
    model answers freely (the grammar allows its own first token, "▁red"; without that, forced
    character pieces answered other colours)."""
    pytest.importorskip("xgrammar")
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"<!-- choice example: (\S+) \| (.+?) \| (\w+) \| (.+?) -> (\w+) -->", readme)
    assert example, "README lost its choice example"
    image_path, question, template, choices, answer = example.groups()
    sample = Sample(Image.open(ROOT / image_path).convert("RGB"), (), "vqa", template, question, answer)
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": png_data_uri(sample)}}]
    options = choices.split(", ")
    response = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": content}],
        max_tokens=16,
        temperature=0,
        logprobs=True,
        top_logprobs=len(options),
        extra_body={"template": template, "guided_choice": options},
    )
    assert response.choices[0].message.content == ask_server(client, MODEL_NAME, sample).strip() == answer
    first = response.choices[0].logprobs.content[0]
    assert first.logprob > -0.5  # the model's own confident token, not a forced piece
