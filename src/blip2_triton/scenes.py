"""Synthetic scenes for the trained embedded BLIP-2: a seed gives an image, its caption and questions with answers.

A scene is a plain background with one to three shapes in a row of three fixed slots (left, middle, right). The
image is three ViT patches wide and each slot is the middle patch of its column, so every shape lies inside exactly
one patch whatever its jitter in size, position and colour, and positions, counts and left/right relations are never
borderline. Every question asked about a scene has exactly one correct answer: a colour is asked about only for a
shape kind that occurs once, a shape only for a colour that occurs once, and no scene holds the same colour and shape
twice. Captions list the shapes left to right.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 230),
    "yellow": (240, 215, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
}
NUMBERS = ("zero", "one", "two", "three")
# Slot names, left to right, as answers to "where is ...?".
POSITIONS = ("left", "middle", "right")
SLOTS = len(POSITIONS)

# The ViT patch the model is built with; the image is SLOTS patches square.
PATCH_SIZE = 16
IMAGE_SIZE = SLOTS * PATCH_SIZE
# Scenes the shipped model was trained on come from seeds below this; evaluation and tests use seeds from here up.
HELD_OUT_SEED_START = 1_000_000_000
_TRAINING_SEEDS_PER_RUN = 100_000_000
_SUPERSAMPLE = 4
_COLOUR_JITTER = 15
_NOISE_STD = 5.0
# Half-size of a shape and how far its centre may move, in pixels of the final image; the largest reach (6.5 + 1.5)
# stays within the half patch around the slot's centre.
_HALF_SIZE_RANGE = (4.5, 6.5)
_CENTRE_JITTER = 1.5


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    slot: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def with_article(self) -> str:
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.name}"

    @property
    def position(self) -> str:
        return POSITIONS[self.slot]


@dataclass(frozen=True)
class Scene:
    seed: int
    image: Image.Image
    background: str
    # Left to right.
    shapes: tuple[Shape, ...]
    caption: str
    # (question, answer); the question ends with "?". Shuffled with the scene's seed, so any prefix is a mix of kinds.
    qa: tuple[tuple[str, str], ...]


def shipped_model_dir(family: str = "opt") -> Path:
    """The trained checkpoint carried as package data (written by `scripts/train_scenes.py`)."""
    return Path(__file__).parent / "data" / f"scenes-blip2-{family}"


def random_held_out_seed() -> int:
    """A seed of a scene no training run draws (for demos: each call a new scene)."""
    return HELD_OUT_SEED_START + secrets.randbelow(10**9)


def training_seeds(run_seed: int) -> range:
    """Scene seeds a training run with this seed draws from, in order; never a held-out one."""
    if not 0 <= run_seed < HELD_OUT_SEED_START // _TRAINING_SEEDS_PER_RUN:
        raise ValueError(f"run seed must be in [0, {HELD_OUT_SEED_START // _TRAINING_SEEDS_PER_RUN}), got {run_seed}")
    first = run_seed * _TRAINING_SEEDS_PER_RUN
    return range(first, first + _TRAINING_SEEDS_PER_RUN)


def vqa_prompt(question: str) -> str:
    """The BLIP-2 prompt for a question, as the client's `ask` builds it."""
    return f"Question: {question} Answer:"


def caption_text(shapes: tuple[Shape, ...]) -> str:
    parts = [s.with_article for s in shapes]
    if len(shapes) == 1:
        return parts[0]
    if len(shapes) == 2:
        return f"{parts[0]} to the left of {parts[1]}"
    return f"{', '.join(parts[:-1])} and {parts[-1]}"


def questions(shapes: tuple[Shape, ...], background: str, rng: random.Random) -> list[tuple[str, str]]:
    """Every question kind that has a unique answer for this scene."""
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
        (f"is there {Shape(absent_kind, absent_colour, 0).with_article}?", "no"),
    ]
    qa += [(f"what colour is the {s.kind}?", s.colour) for s in shapes if kinds.count(s.kind) == 1]
    qa += [(f"what shape is the {s.colour} object?", s.kind) for s in shapes if colours.count(s.colour) == 1]
    qa += [(f"where is the {s.name}?", s.position) for s in shapes]
    if len(shapes) == 2:
        first, second = shapes
        qa += [(f"what is to the left of the {second.name}?", first.name),
               (f"what is to the right of the {first.name}?", second.name)]
    return qa


def _layout(rng: random.Random) -> tuple[str, tuple[Shape, ...]]:
    background = rng.choice(list(BACKGROUNDS))
    count = rng.choice((1, 2, 2, 3, 3))
    slots = sorted(rng.sample(range(SLOTS), count))
    pairs = rng.sample([(c, k) for c in COLOURS for k in SHAPES], count)
    return background, tuple(Shape(kind=k, colour=c, slot=s) for (c, k), s in zip(pairs, slots, strict=True))


def _jittered(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for v in rgb)  # type: ignore[return-value]


def _render(background: str, shapes: tuple[Shape, ...], rng: random.Random, seed: int) -> Image.Image:
    scale = _SUPERSAMPLE
    img = Image.new("RGB", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), _jittered(BACKGROUNDS[background], rng))
    draw = ImageDraw.Draw(img)
    for s in shapes:
        half = rng.uniform(*_HALF_SIZE_RANGE) * scale
        cx = (PATCH_SIZE * (s.slot + 0.5) + rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER)) * scale
        cy = (IMAGE_SIZE / 2 + rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER)) * scale
        fill = _jittered(COLOURS[s.colour], rng)
        if s.kind == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
        elif s.kind == "square":
            h = half * 0.85
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)], fill=fill)
    small = np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, _NOISE_STD, size=small.shape)
    return Image.fromarray(np.clip(small + noise, 0, 255).round().astype(np.uint8))


def make_scene(seed: int) -> Scene:
    rng = random.Random(seed)  # noqa: S311  (scene layout, not secrets)
    background, shapes = _layout(rng)
    qa = questions(shapes, background, rng)
    rng.shuffle(qa)
    image = _render(background, shapes, rng, seed)
    return Scene(seed=seed, image=image, background=background, shapes=shapes, caption=caption_text(shapes),
                 qa=tuple(qa))


def save_scene(scene: Scene, path: str | Path, *, scale: int = 1) -> None:
    """The scene's image, enlarged `scale` times without smoothing (for viewing; the server resizes it back)."""
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    size = (scene.image.width * scale, scene.image.height * scale)
    scene.image.resize(size, Image.Resampling.NEAREST).save(path)


def requests(scene: Scene) -> list[tuple[str | None, str]]:
    """(prompt, expected text) for the caption (prompt None: BLIP-2's no-text path) and every question. The expected
    text is what a server returns: the generated continuation without special tokens, stripped."""
    return [(None, scene.caption), *((vqa_prompt(q), a) for q, a in scene.qa)]
