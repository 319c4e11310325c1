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
    for b in buckets:
        if b >= value:
            return b
    raise ValueError(f"{value} is over the largest bucket, {buckets[-1]}")


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
    """CUDA graphs on one device, captured into one memory pool they share and freed with it; replayed one at a time,
    never concurrently. Capture and replay run with that device current: a KIND_GPU instance's model sits on the GPU
    Triton assigned it, which need not be the process's current device, and a graph runs on the current device's
    stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool: Any = None
        self._stream: Any = None
        self.nbytes = 0

    def capture(self, step: Callable[[], torch.Tensor], what: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """`step` captured: replaying the graph rewrites the returned tensor from the step's input buffers."""
        with torch.cuda.device(self.device):
            # Warm up on a side stream (lazy initialisation must not be captured), then capture into the shared pool.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step()
            torch.cuda.current_stream().wait_stream(stream)
            # The reading after the cache is emptied, as `torch.cuda.graph` empties it on entry: memory freed since
            # (a dead batch's buffers) would otherwise hide this graph's share.
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_reserved()
            graph = torch.cuda.CUDAGraph()
            # A capture stream of this device: `torch.cuda.graph`'s default one belongs to whichever device was
            # current at the process's first capture.
            self._stream = self._stream or torch.cuda.Stream()
            current = torch.cuda.current_stream()
            try:
                with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                    out = step()
            except BaseException:
                # A capture that fails at its end leaves this thread on the capture stream.
                torch.cuda.set_stream(current)
                raise
            self._pool = graph.pool()
            self.nbytes += max(0, torch.cuda.memory_reserved() - before)
        log.debug("captured %s on %s (graphs hold %d bytes)", what, self.device, self.nbytes)
        return graph, out

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        with torch.cuda.device(self.device):
            graph.replay()
