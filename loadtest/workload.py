"""What each simulated request sends: image, optional VQA prompt, max_tokens."""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.images import make_unique

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.txt")


def load_prompts(path: str | Path | None = None) -> list[str]:
    path = Path(path) if path else DEFAULT_PROMPTS
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {path} (one per line, '#' starts a comment)")
    return prompts


@dataclass
class Workload:
    images: list[tuple[str, bytes]]
    prompts: list[str]
    vqa_ratio: float = 0.5
    # Fraction of requests that resend an image byte-for-byte; the rest get unique bytes (same pixels).
    repeat_ratio: float = 0.0
    max_tokens: int | None = None
    model: str = "blip2"
    stage_models: list[str] = field(default_factory=lambda: ["blip2_vision", "blip2_llm"])
    grpc_url: str = "127.0.0.1:8001"
    metrics_url: str | None = None
    request_timeout: float = 120.0
    # Random per process, so a rerun against the same server (whose cache outlives the run) never repeats a tag.
    nonce: str = field(default_factory=lambda: os.urandom(6).hex())

    def __post_init__(self) -> None:
        for name in ("vqa_ratio", "repeat_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if not self.images:
            raise ValueError("no images")
        self._serial = itertools.count()

    def pick(self, rng: random.Random) -> tuple[str, bytes, str | None]:
        """Returns (request name, image bytes, prompt); the name is what the report groups by."""
        _, image = rng.choice(self.images)
        if rng.random() >= self.repeat_ratio:
            image = make_unique(image, f"{self.nonce}-{next(self._serial)}".encode())
        if rng.random() < self.vqa_ratio:
            return "vqa", image, rng.choice(self.prompts)
        return "caption", image, None
