"""Collects what the capacity report needs during a Locust run: one row per request and a metrics scrape at
every measurement-window boundary. Pure Python so it can be unit-tested without Locust's monkey-patching."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest import prom
from loadtest.shapes import Phase

RUN_FORMAT = "blip2-loadtest-run/1"
SAMPLE_COLUMNS = ["t_end", "latency_ms", "ok", "request_type", "name", "response_length"]

Scraper = Callable[[str], list[prom.Sample]]


class RunRecorder:
    def __init__(
        self, metrics_url: str | None = None, scraper: Scraper = prom.scrape, clock: Callable[[], float] = time.time
    ):
        self.metrics_url = metrics_url
        self.scraper = scraper
        self.clock = clock
        self.reset({})

    def reset(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self.samples: list[list] = []
        self.errors: Counter[str] = Counter()
        self.windows: list[dict[str, Any]] = []
        self.started_at = self.clock()
        self._phase: Phase | None = None

    def add(
        self,
        request_type: str,
        name: str,
        response_time: float,
        response_length: int | None,
        exception: BaseException | str | None,
        t_end: float | None = None,
    ) -> None:
        ok = exception is None
        t = t_end if t_end is not None else self.clock()
        self.samples.append([t, float(response_time), int(ok), request_type, name, int(response_length or 0)])
        if not ok:
            self.errors[f"{request_type} {name}: {exception}"[:300]] += 1

    def drain(self) -> dict[str, Any]:
        # Workers ship their buffers to the master with every stats report, then start afresh.
        payload = {"samples": self.samples, "errors": dict(self.errors)}
        self.samples, self.errors = [], Counter()
        return payload

    def merge(self, payload: dict[str, Any]) -> None:
        self.samples.extend(payload.get("samples", []))
        self.errors.update(payload.get("errors", {}))

    def scrape(self) -> dict[str, Any]:
        before = self.clock()
        snapshot: dict[str, Any] = {}
        if self.metrics_url:
            try:
                snapshot["samples"] = [s.to_json() for s in self.scraper(self.metrics_url)]
            except Exception as exc:
                snapshot["error"] = f"{type(exc).__name__}: {exc}"
        # The midpoint is the best single estimate of when the counters were read.
        snapshot["t"] = (before + self.clock()) / 2
        return snapshot

    def advance(self, phase: Phase | None, users_now: int | None = None) -> None:
        """Called on every shape tick; opens/closes measurement windows when the phase changes."""
        prev = self._phase
        same_stage = prev is not None and phase is not None and prev.stage.index == phase.stage.index
        closing = prev is not None and prev.measuring and not (same_stage and phase is not None and phase.measuring)
        opening = phase is not None and phase.measuring and not (same_stage and prev is not None and prev.measuring)
        snapshot = self.scrape() if closing or opening else None
        if closing and snapshot is not None:
            window = self.windows[-1]
            window["end"] = snapshot["t"]
            window["metrics_end"] = snapshot
        if opening and phase is not None and snapshot is not None:
            stage = phase.stage
            self.windows.append(
                {
                    "index": stage.index,
                    "users": stage.users,
                    "users_running": users_now,
                    "planned_start_s": stage.measure_start,
                    "planned_end_s": stage.end,
                    "start": snapshot["t"],
                    "end": None,
                    "metrics_start": snapshot,
                    "metrics_end": None,
                }
            )
        self._phase = phase

    def close(self) -> None:
        # An interrupted run (Ctrl+C, --run-time) still gets its last partial window.
        self.advance(None)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "config": self.config,
            "started_at": self.started_at,
            "windows": [w for w in self.windows if w["end"] is not None],
            "sample_columns": SAMPLE_COLUMNS,
            "samples": sorted(self.samples, key=lambda row: row[0]),
            "errors": dict(self.errors),
        }

    def dump(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), separators=(",", ":")))
        tmp.replace(path)
        return path
