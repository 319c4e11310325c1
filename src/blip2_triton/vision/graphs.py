"""The vision stage's forward on fixed input buffers per batch bucket: the form CUDA graphs need (BLIP2_CUDA_GRAPHS).

HF's eager ViT + Q-Former forward costs a batch its Python and kernel launches whatever the batch size (bounded by
launches on a GPU, issue 22). Here a batch's pixels are copied into one buffer allocated once, padded with zero rows
up to its bucket, and the bucket's forward (`get_image_features`: ViT, Q-Former, language projection, the stage's
own computation) runs on the buffer's first `bucket` rows; the padding rows' outputs are dropped. On CUDA each
bucket's forward is captured once as a graph and replayed; elsewhere the same forward runs eagerly (the CPU tests
run it that way). Rows never mix, so padding changes an image's embedding only through the rounding of batched
kernels.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..cuda_graphs import GraphPool, bucket

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)

Forward = Callable[[torch.Tensor], torch.Tensor]


class BucketedForward:
    """`forward` (pixel values [rows, channels, height, width] -> per-row features) on fixed buffers per bucket."""

    def __init__(self, forward: Forward, *, pixel_shape: tuple[int, ...], device: torch.device,
                 graphs: bool) -> None:
        self.forward = forward
        self.graphs = graphs
        # Pixels stay in the processor's float32: the model casts them, inside the graph, as HF's forward does.
        self.inputs = torch.zeros((BATCH_BUCKETS[-1], *pixel_shape), dtype=torch.float32, device=device)
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = GraphPool(device)
        # Graph outputs are overwritten by the next replay, and the buffer is shared by every bucket.
        self._lock = threading.Lock()

    @property
    def graph_bytes(self) -> int:
        return self.pool.nbytes

    def capture(self, max_rows: int) -> None:
        """Captures every bucket up to the one `max_rows` needs (nothing without graphs): memory and capture time
        are spent at load instead of on the first batches."""
        if not self.graphs:
            return
        top = bucket(min(max_rows, BATCH_BUCKETS[-1]), BATCH_BUCKETS)
        with self._lock, torch.inference_mode():
            for rows in (b for b in BATCH_BUCKETS if b <= top):
                self._graph(rows)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Per-row features of `pixels`, float32 on the CPU; batches past the largest bucket run in chunks."""
        if tuple(pixels.shape[1:]) != tuple(self.inputs.shape[1:]):
            raise ValueError(f"pixel values: expected rows of {tuple(self.inputs.shape[1:])}, "
                             f"got {tuple(pixels.shape[1:])}")
        limit = BATCH_BUCKETS[-1]
        return torch.cat([self._run(pixels[start:start + limit]) for start in range(0, len(pixels), limit)])

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        n = len(pixels)
        rows = bucket(n, BATCH_BUCKETS)
        with self._lock:
            self.inputs[:n].copy_(pixels, non_blocking=True)
            # Zero padding, not the previous batch's rows: an image's result must not depend on what ran before.
            self.inputs[n:rows].zero_()
            if self.graphs:
                graph, out = self._graph(rows)
                self.pool.replay(graph)
            else:
                out = self.forward(self.inputs[:rows])
            return out[:n].float().cpu()

    def _graph(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if rows not in self._captured:
            self._captured[rows] = self.pool.capture(lambda: self.forward(self.inputs[:rows]),
                                                     f"the vision forward for {rows} images")
        return self._captured[rows]
