"""Deterministic synthetic data: one to three coloured shapes on light noise, and text tasks in
CogVLM's formats: captions (chat template), short answers (vqa template) and grounding boxes
(base template, `[[x0,y0,x1,y1]]` with coordinates x 1000, three digits).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 112
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 205, 40),
          "purple": (150, 60, 190), "orange": (245, 140, 30)}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "1", 2: "2", 3: "3"}


@dataclass(frozen=True)
class Shape:
    color: str
    kind: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive-exclusive

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    shapes: tuple[Shape, ...]
    task: str  # caption | vqa | grounding
    template: str  # chat | vqa | base
    question: str
    answer: str
    subjects: tuple[Shape, ...] = ()  # the shapes the question names, in the order it names them


def box_text(box: tuple[int, int, int, int], size: int = IMAGE_SIZE) -> str:
    """CogVLM's grounding format: [[x0,y0,x1,y1]], coordinates relative x 1000, zero-padded."""
    return "[[" + ",".join(f"{min(999, round(v * 1000 / size)):03d}" for v in box) + "]]"


def parse_box(text: str) -> tuple[float, ...] | None:
    inner = text.strip().removeprefix("[[").removesuffix("]]")
    parts = inner.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        return None
    return tuple(int(p) / 1000 for p in parts)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def draw_scene(rng: random.Random, size: int = IMAGE_SIZE) -> tuple[Image.Image, tuple[Shape, ...]]:
    noise = rng.randbytes(size * size)
    kinds = [(c, k) for c in COLORS for k in SHAPES]
    rng.shuffle(kinds)
    shapes: list[Shape] = []
    for color, kind in kinds[: rng.randint(1, 3)]:
        for _ in range(50):  # place without overlap (2 px apart), so boxes and relations are clear
            w = rng.randint(size // 5, size // 3)
            x, y = rng.randint(0, size - w), rng.randint(0, size - w)
            box = (x, y, x + w, y + w)
            if all(box[2] + 2 <= s.box[0] or s.box[2] + 2 <= box[0] or box[3] + 2 <= s.box[1]
                   or s.box[3] + 2 <= box[1] for s in shapes):  # fmt: skip
                shapes.append(Shape(color, kind, box))
                break
    return render(tuple(shapes), noise, size), tuple(shapes)


def render(shapes: tuple[Shape, ...], noise: bytes, size: int = IMAGE_SIZE) -> Image.Image:
    """Shapes on light grey noise (noise: size * size random bytes)."""
    image = Image.frombytes("L", (size, size), noise).point(lambda v: 215 + v // 8).convert("RGB")
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        box, fill = shape.box, COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill)
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3] - 1), (box[2] - 1, box[3] - 1)], fill=fill)
    return image


def caption(shapes: tuple[Shape, ...]) -> str:
    names = [f"a {s.name}" for s in sorted(shapes, key=lambda s: s.center[0])]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def vqa_pairs(shapes: tuple[Shape, ...]) -> list[tuple[str, str, tuple[Shape, ...]]]:
    """Every unambiguous short-answer question about the scene: (question, answer, the shapes it names)."""
    pairs = [("How many shapes are there?", NUMBER_WORDS[len(shapes)], ())]
    for s in shapes:
        if sum(o.kind == s.kind for o in shapes) == 1:
            pairs.append((f"What color is the {s.kind}?", s.color, (s,)))
        if sum(o.color == s.color for o in shapes) == 1:
            pairs.append((f"What shape is the {s.color} one?", s.kind, (s,)))
    for a in shapes:
        for b in shapes:
            if a is b:
                continue
            dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
            if abs(dx) >= 6:
                pairs.append((f"Is the {a.name} left or right of the {b.name}?", "left" if dx < 0 else "right", (a, b)))
            if abs(dy) >= 6:
                pairs.append((f"Is the {a.name} above or below the {b.name}?", "above" if dy < 0 else "below", (a, b)))
    return pairs


TASK_WEIGHTS = (2, 4, 4)  # caption, vqa, grounding: how often training draws each


def make_sample(rng: random.Random, task: str | None = None, weights: tuple[float, ...] = TASK_WEIGHTS) -> Sample:
    image, shapes = draw_scene(rng)
    task = task or rng.choices(["caption", "vqa", "grounding"], weights=weights)[0]
    if task == "caption":
        return Sample(image, shapes, task, "chat", "Describe the image.", caption(shapes))
    if task == "vqa":
        question, answer, subjects = rng.choice(vqa_pairs(shapes))
        return Sample(image, shapes, task, "vqa", question, answer, subjects)
    target = rng.choice(shapes)
    return Sample(image, shapes, task, "base", f"Where is the {target.name}?", box_text(target.box), (target,))


def samples(seed: int, count: int, task: str | None = None) -> list[Sample]:
    rng = random.Random(seed)
    return [make_sample(rng, task) for _ in range(count)]


def corpus(seed: int = 12345, count: int = 3000) -> list[str]:
    """Text the tokenizer is trained on: prompts as the templates write them, then the answers."""
    from model.processor import prompt_text

    return [f"{prompt_text(s.question, (), s.template)} {s.answer}" for s in samples(seed, count)]
