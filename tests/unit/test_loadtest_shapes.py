from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `loadtest` is a plain directory of the checkout, not an installed package

from loadtest.shapes import MAX_USERS, fixed_plan, phase_at, step_plan, total_duration  # noqa: E402


def test_step_plan_rises_by_step_users() -> None:
    stages = step_plan(step_users=4, step_duration=30, max_steps=3, warmup=5)
    assert [s.users for s in stages] == [4, 8, 12]
    assert [s.start for s in stages] == [0, 30, 60]
    assert [s.measure_start for s in stages] == [5, 35, 65]
    assert total_duration(stages) == 90


def test_phase_at_tracks_warmup_measurement_and_end() -> None:
    stages = step_plan(step_users=2, step_duration=10, max_steps=2, warmup=3)
    assert phase_at(stages, 0).stage.users == 2 and not phase_at(stages, 0).measuring
    assert phase_at(stages, 3).measuring
    assert phase_at(stages, 9.99).stage.index == 0
    assert phase_at(stages, 10).stage.users == 4 and not phase_at(stages, 10).measuring
    assert phase_at(stages, 13.5).measuring
    assert phase_at(stages, 20) is None


def test_fixed_plan_warms_up_once_then_contiguous_intervals() -> None:
    stages = fixed_plan(users=16, duration=250, interval=60, warmup=10)
    assert {s.users for s in stages} == {16}
    assert [(s.start, s.duration, s.warmup) for s in stages] == [
        (0, 70, 10),
        (70, 60, 0),
        (130, 60, 0),
        (190, 60, 0),
    ]
    assert total_duration(stages) == 250
    # Contiguous windows: each measurement window starts where the previous one ended.
    for before, after in itertools.pairwise(stages):
        assert before.end == after.measure_start


@pytest.mark.parametrize(
    "kwargs",
    [
        {"step_users": 0, "step_duration": 10, "max_steps": 2, "warmup": 1},
        {"step_users": MAX_USERS, "step_duration": 10, "max_steps": 2, "warmup": 1},
        {"step_users": 4, "step_duration": 10, "max_steps": 0, "warmup": 1},
        {"step_users": 4, "step_duration": 10, "max_steps": 2, "warmup": 10},
        {"step_users": 4, "step_duration": 10_000, "max_steps": 10, "warmup": 1},
    ],
)
def test_step_plan_bounds(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        step_plan(**kwargs)


def test_fixed_plan_bounds() -> None:
    with pytest.raises(ValueError):
        fixed_plan(users=MAX_USERS + 1, duration=60, interval=10, warmup=1)
    with pytest.raises(ValueError):
        fixed_plan(users=4, duration=60, interval=0, warmup=1)
    with pytest.raises(ValueError):
        fixed_plan(users=4, duration=10, interval=5, warmup=10)
