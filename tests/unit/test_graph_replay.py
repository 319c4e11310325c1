"""The CPU stand-in for CUDA graphs (tests/graph_replay.py) catches what a GPU would: values fixed at capture and
host syncs inside a capture."""

from __future__ import annotations

import pytest
import torch
from graph_replay import ReplayPool


def test_a_replay_reads_the_captured_buffers_not_a_replacement() -> None:
    pool = ReplayPool()
    state = {"x": torch.ones(4)}
    graph, out = pool.capture(lambda: state["x"] * 2, "double")
    state["x"].fill_(3)  # updated in place: the replay sees it
    pool.replay(graph)
    assert out.tolist() == [6.0] * 4
    state["x"] = torch.full((4,), 5.0)  # replaced: a graph keeps reading the old tensor
    pool.replay(graph)
    assert out.tolist() == [6.0] * 4


@pytest.mark.parametrize("step", [
    lambda x: torch.tensor(x.tolist()),
    lambda x: x[x > 0],
    lambda x: x * x.sum().item(),
], ids=["tolist", "boolean_mask", "item"])
def test_a_capture_that_would_sync_the_host_fails(step) -> None:  # type: ignore[no-untyped-def]
    x = torch.arange(4.0)
    with pytest.raises(RuntimeError, match="host syncs inside the capture"):
        ReplayPool().capture(lambda: step(x), "syncing step")


def test_writing_a_python_scalar_is_capturable() -> None:
    x, index = torch.arange(4.0), torch.tensor([1, 2])  # inputs live before the capture, as on a GPU

    def step() -> torch.Tensor:
        y = x.clone()
        y[index] = 0.0
        return y

    _, out = ReplayPool().capture(step, "scalar write")
    assert out.tolist() == [0.0, 0.0, 0.0, 3.0]
