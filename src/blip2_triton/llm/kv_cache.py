"""The running batch's KV cache: preallocated buffers written in place.

HF's `DynamicCache` concatenates every layer's keys and values on every step, and re-batching the running set (a
newcomer joins, a finished row leaves) would copy the whole cache again. Here each layer keeps its keys and values
in one buffer with spare rows and columns: a decoding step writes one column in place, a newcomer's prefill is
copied into free rows, a finished row is overwritten by a row from the end (one row copied), and all-padding columns
on the left are dropped by moving an offset. HF attention reads views of the live region `[:rows, :, start:end]`.

Layout is the engine's left-padded one: every row's newest token sits in the last live column, and the attention
mask (kept by `batch.BatchState`, one column per live column) marks each row's own positions. Buffers start zeroed and
padding only ever holds zeros or another row's finite values, which masked attention weighs by exactly zero.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class SlotLayer(DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, *, spare_rows: int, spare_cols: int,
                 max_rows: int) -> None:
        super().__init__()
        rows, heads, cols, dim = keys.shape
        self.spare_cols, self.max_rows = spare_cols, max_rows
        self.kbuf = keys.new_zeros(rows + spare_rows, heads, cols + spare_cols, dim)
        self.vbuf = values.new_zeros(rows + spare_rows, heads, cols + spare_cols, dim)
        self.kbuf[:rows, :, :cols] = keys
        self.vbuf[:rows, :, :cols] = values
        self.rows, self.start, self.end = rows, 0, cols
        self.device = keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self.kbuf[: self.rows, :, self.start : self.end]
        self.values = self.vbuf[: self.rows, :, self.start : self.end]

    def _reserve(self, rows: int, front: int, back: int) -> None:
        """Makes room for `rows` rows, `front` columns before `start` and `back` columns after `end`."""
        cap_rows, _, cap_cols, _ = self.kbuf.shape
        if rows <= cap_rows and front <= self.start and self.end + back <= cap_cols:
            return
        width = self.end - self.start
        # Every reallocation (growth, or compaction once dropped left columns have used up the room) sizes the
        # buffers to the need plus some slack: reallocations stay rare, and memory stays close to what the
        # batch uses (the `blip2_kv_cache_bytes` metric reports it).
        new_rows = cap_rows if rows <= cap_rows else min(max(rows, self.max_rows), rows + max(8, rows // 4))
        need = front + width + back
        new_cols = need + max(self.spare_cols, need // 8)
        for name in ("kbuf", "vbuf"):
            old = getattr(self, name)
            new = old.new_zeros(new_rows, old.shape[1], new_cols, old.shape[3])
            new[: self.rows, :, front : front + width] = old[: self.rows, :, self.start : self.end]
            setattr(self, name, new)
        self.start, self.end = front, front + width

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        # Called once per layer per step, nearly always inside the model's inference-mode forward: entering the
        # mode again on every call costs launch-bound GPU steps more than the writes themselves.
        if not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                return self.update(key_states, value_states, *args, **kwargs)
        new = key_states.shape[-2]
        self._reserve(self.rows, 0, new)
        self.kbuf[: self.rows, :, self.end : self.end + new] = key_states
        self.vbuf[: self.rows, :, self.end : self.end + new] = value_states
        self.end += new
        self._views()
        return self.keys, self.values

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Adds rows whose newest position is aligned with the others'; returns the columns added on the left."""
        rows, _, cols, _ = keys.shape
        grow = max(0, cols - (self.end - self.start))
        self._reserve(self.rows + rows, grow, 0)
        self.start -= grow
        self.kbuf[self.rows : self.rows + rows, :, self.end - cols : self.end] = keys
        self.vbuf[self.rows : self.rows + rows, :, self.end - cols : self.end] = values
        if cols < self.end - self.start:
            # Reused rows may hold a retired sequence's values left of the newcomer; zero them so a row's
            # padding never depends on what ran before (masked either way).
            self.kbuf[self.rows : self.rows + rows, :, self.start : self.end - cols] = 0
            self.vbuf[self.rows : self.rows + rows, :, self.start : self.end - cols] = 0
        self.rows += rows
        self._views()
        return grow

    def move_rows(self, moves: list[tuple[int, int]], rows: int) -> None:
        for dst, src in moves:
            self.kbuf[dst, :, self.start : self.end] = self.kbuf[src, :, self.start : self.end]
            self.vbuf[dst, :, self.start : self.end] = self.vbuf[src, :, self.start : self.end]
        self.rows = rows
        self._views()

    def drop_front(self, cols: int) -> None:
        self.start += cols
        self._views()


class SlotKVCache:
    """The running batch's cache; `cache` is what the model is given (a `DynamicCache` of `SlotLayer`s).

    Buffers are inference tensors (the model writes them under `torch.inference_mode`), so every method that
    writes them runs in that mode too, whichever thread or context calls it.
    """

    @torch.inference_mode()
    def __init__(self, prefilled: Any, *, spare_rows: int = 8, spare_cols: int = 32, max_rows: int = 64) -> None:
        layers = list(prefilled.layers)
        unsupported = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
        if unsupported:
            raise NotImplementedError(
                f"in-flight batching supports full-attention KV caches (DynamicLayer), got {sorted(unsupported)}"
            )
        self.cache = DynamicCache()
        self.cache.layers = [SlotLayer(layer.keys, layer.values, spare_rows=spare_rows, spare_cols=spare_cols,
                                       max_rows=max_rows) for layer in layers]

    @property
    def _layers(self) -> list[SlotLayer]:
        return self.cache.layers  # type: ignore[no-any-return]

    @property
    def rows(self) -> int:
        return self._layers[0].rows

    @property
    def nbytes(self) -> int:
        """Memory held by the buffers, spare rows and columns included."""
        return sum(layer.kbuf.nbytes + layer.vbuf.nbytes for layer in self._layers)

    @property
    def width(self) -> int:
        first = self._layers[0]
        return first.end - first.start

    @torch.inference_mode()
    def append(self, prefilled: Any) -> int:
        """Adds a prefilled group's rows after the current ones; returns the columns added on the left."""
        grown = {layer.append(new.keys, new.values) for layer, new in zip(self._layers, prefilled.layers,
                                                                          strict=True)}
        (grow,) = grown
        return grow

    @torch.inference_mode()
    def keep(self, keep: list[int]) -> list[int]:
        """Keeps the rows `keep` (ascending); returns the old index of each row in the new order.

        Rows past the new end move into the freed slots, so only as many rows are copied as there are holes.
        """
        rows = len(keep)
        kept = set(keep)
        holes = [i for i in range(rows) if i not in kept]
        movers = [i for i in keep if i >= rows]
        moves = list(zip(holes, movers, strict=True))
        order = list(range(rows))
        for hole, mover in moves:
            order[hole] = mover
        for layer in self._layers:
            layer.move_rows(moves, rows)
        return order

    @torch.inference_mode()
    def drop_front(self, cols: int) -> None:
        for layer in self._layers:
            layer.drop_front(cols)
