"""What the stages' fixed-buffer paths share (`cuda_graphs`, BLIP2_CUDA_GRAPHS): whether the option turns one on,
shape buckets, and capturing a step into CUDA graphs that share one memory pool."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .errors import ConfigurationError

log = logging.getLogger(__name__)


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= value)


def quantized(module: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("bitsandbytes") for m in module.modules())


def fixed_buffers(mode: str, *, reason: str | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `cuda_graphs=mode` puts a stage on its fixed-buffer path; `reason`: why that path cannot serve it,
    or None. `on` refuses to start where it cannot apply; `auto` takes it on CUDA in float16/bfloat16 only."""
    if mode == "off":
        return False
    if mode == "on":
        if reason is not None:
            raise ConfigurationError(f"cuda_graphs=on: {reason}")
        return True
    return reason is None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


class GraphPool:
    """CUDA graphs on one device, captured into one shared memory pool: they are replayed one at a time, never
    concurrently. Capture and replay run with that device current: a KIND_GPU instance's model sits on the GPU Triton
    assigned it, which need not be the process's current device, and a graph runs on the current device's stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool: Any = None
        self.nbytes = 0

    def capture(self, step: Callable[[], torch.Tensor], what: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """`step` captured: replaying the graph rewrites the returned tensor from the step's input buffers."""
        with torch.cuda.device(self.device):
            # Warm up on a side stream (lazy initialisation must not be captured), then capture into the shared pool.
            before = torch.cuda.memory_reserved()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = step()
            self._pool = graph.pool()
            self.nbytes += max(0, torch.cuda.memory_reserved() - before)
        log.info("captured %s on %s (graphs hold %d bytes)", what, self.device, self.nbytes)
        return graph, out

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        with torch.cuda.device(self.device):
            graph.replay()
