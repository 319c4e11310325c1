"""CUDA-graph semantics on CPU, for tests of the code that captures and replays graphs."""

from __future__ import annotations

from collections.abc import Callable

import torch


class ReplayPool:
    """Stands in for `cuda_graphs.GraphPool`: capture runs the step once and keeps its output tensor; a replay
    recomputes the step as captured (the buffers it closed over, whatever the caller holds now) into that tensor,
    as a replayed CUDA graph does."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.captured: list[str] = []

    def capture(self, step: Callable[[], torch.Tensor], what: str) -> tuple[Callable[[], None], torch.Tensor]:
        self.captured.append(what)
        out = step()
        return (lambda: out.copy_(step())), out

    def replay(self, graph: Callable[[], None]) -> None:
        graph()
