"""Prometheus text-format parsing and scraping of Triton's metrics endpoint."""

from __future__ import annotations

import math
import re
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+(-?\d+))?\s*$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float

    def to_json(self) -> list:
        return [self.name, self.labels, _json_float(self.value)]

    @classmethod
    def from_json(cls, item: list) -> Sample:
        name, labels, value = item
        return cls(name, dict(labels), float(value) if value is not None else math.nan)


def _json_float(value: float) -> float | None:
    # JSON has no NaN/Inf; None round-trips as NaN through from_json.
    return value if math.isfinite(value) else None


def _parse_value(text: str) -> float:
    lowered = text.lower()
    if lowered in ("+inf", "inf"):
        return math.inf
    if lowered == "-inf":
        return -math.inf
    return float(text)  # float() also accepts "NaN"


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _LABEL_RE.match(text, pos)
        if not match:
            raise ValueError(f"bad label set: {{{text}}}")
        value = re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], match.group(2))
        labels[match.group(1)] = value
        pos = match.end()
    return labels


def parse_prometheus(text: str) -> list[Sample]:
    samples = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if not match:
            raise ValueError(f"bad metrics line: {raw!r}")
        name, labels, value, _timestamp = match.groups()
        samples.append(Sample(name, _parse_labels(labels) if labels else {}, _parse_value(value)))
    return samples


def by_model(samples: Iterable[Sample], name: str) -> dict[str, float]:
    """Sum one metric per `model` label; Triton adds a `version` label we fold together."""
    totals: dict[str, float] = {}
    for sample in samples:
        if sample.name == name and "model" in sample.labels:
            model = sample.labels["model"]
            totals[model] = totals.get(model, 0.0) + sample.value
    return totals


# Triton's built-ins plus the server's custom families (LLM engine, vision embedding cache); the rest is noise.
SCRAPE_PREFIXES = ("nv_", "blip2_")


def scrape(url: str, timeout: float = 3.0, prefixes: tuple[str, ...] = SCRAPE_PREFIXES) -> list[Sample]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode("utf-8", errors="replace")
    return [s for s in parse_prometheus(text) if s.name.startswith(prefixes)]
