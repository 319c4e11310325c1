"""Synthetic scenes for the trained embedded BLIP-2: a seed gives an image, its caption and questions with answers.

A scene is a plain background with one to three shapes, each in its own cell of a 3 × 3 grid (so positions,
counts and left/right/above relations are never borderline), with jittered size, position and colour and pixel
noise. Every question asked about a scene has exactly one correct answer: a colour is asked about only for a shape
kind that occurs once, a shape only for a colour that occurs once, and no scene holds the same colour and shape
twice. Captions list the shapes in reading order (rows top to bottom, left to right within a row).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 50),
    "blue": (40, 75, 225),
    "yellow": (240, 215, 35),
    "purple": (145, 50, 185),
    "orange": (250, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 242),
    "black": (22, 22, 22),
    "gray": (128, 128, 128),
}
NUMBERS = ("zero", "one", "two", "three")
# Grid cells by (row, column), named as answers to "where is ...?".
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)

IMAGE_SIZE = 96
# Scenes the shipped model was trained on come from seeds below this; evaluation and tests use seeds from here up.
HELD_OUT_SEED_START = 1_000_000_000
_SUPERSAMPLE = 4
_COLOUR_JITTER = 22
_NOISE_STD = 7.0
# Half-size of a shape as a fraction of its cell, and how far its centre may move (fraction of the room left).
_SIZE_RANGE = (0.28, 0.37)
_CENTRE_JITTER = 0.4


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def with_article(self) -> str:
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.name}"

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]


@dataclass(frozen=True)
class Scene:
    seed: int
    image: Image.Image
    background: str
    # In reading order.
    shapes: tuple[Shape, ...]
    caption: str
    # (question, answer); the question ends with "?". Shuffled with the scene's seed, so any prefix is a mix of kinds.
    qa: tuple[tuple[str, str], ...]


def shipped_model_dir(family: str = "opt") -> Path:
    """The trained checkpoint carried as package data (written by `scripts/train_scenes.py`)."""
    return Path(__file__).parent / "data" / f"scenes-blip2-{family}"


def vqa_prompt(question: str) -> str:
    """The BLIP-2 prompt for a question, as the client's `ask` builds it."""
    return f"Question: {question} Answer:"


def caption_text(shapes: tuple[Shape, ...]) -> str:
    parts = [s.with_article for s in shapes]
    if len(shapes) == 1:
        return parts[0]
    if len(shapes) == 2:
        relation = "to the left of" if shapes[0].row == shapes[1].row else "above"
        return f"{parts[0]} {relation} {parts[1]}"
    return f"{', '.join(parts[:-1])} and {parts[-1]}"


def questions(shapes: tuple[Shape, ...], background: str, rng: random.Random) -> list[tuple[str, str]]:
    """Every question kind that has a unique answer for this scene, grouped by kind (a list per kind)."""
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]
    present = {(s.colour, s.kind) for s in shapes}
    absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
    absent_colour, absent_kind = absent[rng.randrange(len(absent))]
    present_shape = shapes[rng.randrange(len(shapes))]
    counted = SHAPES[rng.randrange(len(SHAPES))]
    qa = [
        ("how many shapes are there?", NUMBERS[len(shapes)]),
        (f"how many {counted}s are there?", NUMBERS[kinds.count(counted)]),
        ("what colour is the background?", background),
        (f"is there {present_shape.with_article}?", "yes"),
        (f"is there {Shape(absent_kind, absent_colour, 0, 0).with_article}?", "no"),
    ]
    qa += [(f"what colour is the {s.kind}?", s.colour) for s in shapes if kinds.count(s.kind) == 1]
    qa += [(f"what shape is the {s.colour} object?", s.kind) for s in shapes if colours.count(s.colour) == 1]
    qa += [(f"where is the {s.name}?", s.position) for s in shapes]
    if len(shapes) == 2:
        first, second = shapes
        before, after = ("to the left of", "to the right of") if first.row == second.row else ("above", "below")
        qa += [(f"what is {before} the {second.name}?", first.name),
               (f"what is {after} the {first.name}?", second.name)]
    return qa


def _layout(rng: random.Random) -> tuple[str, tuple[Shape, ...]]:
    background = rng.choice(list(BACKGROUNDS))
    count = rng.choice((1, 2, 2, 3, 3))
    cells = [(r, c) for r in range(3) for c in range(3)]
    if count == 2:
        # Two shapes share a row or a column, so the caption's relation is exact.
        if rng.random() < 0.5:
            row = rng.randrange(3)
            cols = sorted(rng.sample(range(3), 2))
            chosen = [(row, c) for c in cols]
        else:
            col = rng.randrange(3)
            rows = sorted(rng.sample(range(3), 2))
            chosen = [(r, col) for r in rows]
    else:
        chosen = sorted(rng.sample(cells, count))
    pairs = rng.sample([(c, k) for c in COLOURS for k in SHAPES], count)
    shapes = (Shape(kind=k, colour=c, row=r, col=col) for (c, k), (r, col) in zip(pairs, chosen, strict=True))
    return background, tuple(shapes)


def _jittered(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for v in rgb)  # type: ignore[return-value]


def _render(background: str, shapes: tuple[Shape, ...], rng: random.Random, seed: int, size: int) -> Image.Image:
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), _jittered(BACKGROUNDS[background], rng))
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for s in shapes:
        # Half-size and centre jitter keep every shape inside its own cell.
        half = cell * rng.uniform(*_SIZE_RANGE)
        slack = (cell / 2 - half) * _CENTRE_JITTER
        cx = cell * (s.col + 0.5) + rng.uniform(-slack, slack)
        cy = cell * (s.row + 0.5) + rng.uniform(-slack, slack)
        fill = _jittered(COLOURS[s.colour], rng)
        if s.kind == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
        elif s.kind == "square":
            h = half * 0.85
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)], fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)
    small = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, _NOISE_STD, size=small.shape)
    return Image.fromarray(np.clip(small + noise, 0, 255).round().astype(np.uint8))


def make_scene(seed: int, *, size: int = IMAGE_SIZE) -> Scene:
    rng = random.Random(seed)  # noqa: S311  (scene layout, not secrets)
    background, shapes = _layout(rng)
    qa = questions(shapes, background, rng)
    rng.shuffle(qa)
    image = _render(background, shapes, rng, seed, size)
    return Scene(seed=seed, image=image, background=background, shapes=shapes, caption=caption_text(shapes),
                 qa=tuple(qa))


def requests(scene: Scene) -> list[tuple[str | None, str]]:
    """(prompt, expected text) for the caption (prompt None: BLIP-2's no-text path) and every question. The expected
    text is what a server returns: the generated continuation without special tokens, stripped."""
    return [(None, scene.caption), *((vqa_prompt(q), a) for q, a in scene.qa)]
