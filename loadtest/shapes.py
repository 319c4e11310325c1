"""Load schedules (pure, no Locust import so they are unit-testable without gevent monkey-patching).

A schedule is a list of stages. Each stage holds a fixed number of users for `duration` seconds; its
measurement window starts `warmup` seconds in, so ramp-up and queue fill are excluded from the figures.
"""

from __future__ import annotations

from dataclasses import dataclass

# Hard bounds: a typo such as --step-users 800 must not turn a capacity test into a denial-of-service.
MAX_USERS = 1024
MAX_DURATION_S = 24 * 3600


@dataclass(frozen=True)
class Stage:
    index: int
    users: int
    start: float
    duration: float
    warmup: float

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def measure_start(self) -> float:
        return self.start + self.warmup


@dataclass(frozen=True)
class Phase:
    stage: Stage
    measuring: bool


def _check(users: int, duration: float, warmup: float) -> None:
    if not 1 <= users <= MAX_USERS:
        raise ValueError(f"users must be in 1..{MAX_USERS}, got {users}")
    if duration <= 0 or warmup < 0 or warmup >= duration:
        raise ValueError(f"need 0 <= warmup < duration, got warmup={warmup} duration={duration}")


def step_plan(
    step_users: int, step_duration: float, max_steps: int, warmup: float, start_users: int = 0
) -> list[Stage]:
    """Users = start_users + step_users * (i + 1) for step i; every step gets its own warmup because adding
    users shifts the batching equilibrium."""
    if max_steps < 1:
        raise ValueError("max_steps must be >= 1")
    stages = []
    for i in range(max_steps):
        users = start_users + step_users * (i + 1)
        _check(users, step_duration, warmup)
        stages.append(Stage(i, users, i * step_duration, step_duration, warmup))
    _check_total(stages)
    return stages


def fixed_plan(users: int, duration: float, interval: float, warmup: float) -> list[Stage]:
    """Constant load split into report intervals; only the first one has a warmup because the load never changes,
    so a soak shows drift (leaks, thermal throttling) interval by interval."""
    if interval <= 0:
        raise ValueError("interval must be > 0")
    if warmup >= duration:
        raise ValueError("warmup must be shorter than the duration")
    stages: list[Stage] = []
    start = 0.0
    while start < duration - 1e-9:
        length = min(interval + (warmup if not stages else 0.0), duration - start)
        stage_warmup = warmup if not stages else 0.0
        if length <= stage_warmup:
            break
        _check(users, length, stage_warmup)
        stages.append(Stage(len(stages), users, start, length, stage_warmup))
        start += length
    _check_total(stages)
    return stages


def _check_total(stages: list[Stage]) -> None:
    if stages and stages[-1].end > MAX_DURATION_S:
        raise ValueError(f"schedule runs {stages[-1].end:.0f}s, more than the {MAX_DURATION_S}s bound")


def total_duration(stages: list[Stage]) -> float:
    return stages[-1].end if stages else 0.0


def phase_at(stages: list[Stage], run_time: float) -> Phase | None:
    for stage in stages:
        if run_time < stage.end:
            return Phase(stage, run_time >= stage.measure_start)
    return None
