"""Deterministic synthetic images (coloured shapes on noise) for load tests and benchmarks."""

from __future__ import annotations

import base64
import io
import random

from PIL import Image, ImageDraw

COLORS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40), (150, 60, 180), (240, 140, 30)]


def synthetic_image(seed: int, size: int = 490) -> bytes:
    """PNG bytes: one to three shapes at random places; the same seed gives the same bytes."""
    rng = random.Random(seed)
    noise = Image.frombytes("L", (size, size), rng.randbytes(size * size))  # seeded, unlike effect_noise
    image = noise.point(lambda v: 200 + v // 5).convert("RGB")  # light grey noise
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        w = rng.randint(size // 8, size // 3)
        x, y = rng.randint(0, size - w), rng.randint(0, size - w)
        color = rng.choice(COLORS)
        kind = rng.choice(["circle", "square", "triangle"])
        if kind == "circle":
            draw.ellipse((x, y, x + w, y + w), fill=color)
        elif kind == "square":
            draw.rectangle((x, y, x + w, y + w), fill=color)
        else:
            draw.polygon([(x + w // 2, y), (x, y + w), (x + w, y + w)], fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
