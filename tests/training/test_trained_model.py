"""The embedded default model answers through the HTTP server: colour and count questions on a
held-out slice (what it has learned; see its model card), and the README's first example. Its
answers fall to chance if anything in the stack computes wrongly."""

import re
from pathlib import Path

import openai
import pytest
from PIL import Image

from server.config import DEFAULT_MODEL, ServeConfig
from tests.server.live_server import MODEL_NAME, running_engine, serve
from training.evaluate import HELD_OUT_SEED, ask_server, is_correct
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


def test_colour_and_count_questions_through_the_server(client):
    """Measured on 114 held-out questions: 85%. Chance is about 1 in 6 for colours, 1 in 3 for counts."""
    items = [s for s in samples(HELD_OUT_SEED + 1, 120, "vqa") if s.question.startswith(("What color", "How many"))]
    items = items[:40]
    correct = sum(is_correct(s, ask_server(client, MODEL_NAME, s)) for s in items)
    assert correct / len(items) >= 0.7, f"{correct}/{len(items)}"


def test_readme_first_example_is_answered_correctly(client):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"<!-- example: (\S+) \| (.+?) \| (\w+) \| (.+?) -->", readme)
    assert example, "README lost its first example"
    image_path, question, template, answer = example.groups()
    sample = Sample(Image.open(ROOT / image_path).convert("RGB"), (), "vqa", template, question, answer)
    assert ask_server(client, MODEL_NAME, sample).strip() == answer
