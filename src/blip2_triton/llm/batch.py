"""The running batch on the device: its sequences in row order, their KV buffers (`kv_cache.py`) and the attention
mask. Sequences join through a prefill's cache, leave by row, and the batch drops padding columns nobody uses.

Layout is left-padded: every row's newest token sits in the last column, and the mask marks each row's own positions.
Row lengths are known on the host (`Sequence.cached_positions`), so no decision here reads the mask from the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .kv_cache import SlotKVCache
from .sequence import Sequence


@dataclass
class Prefilled:
    """A prefill's result for a group of sequences: KV cache, attention mask, last-position logits."""

    cache: Any
    mask: torch.Tensor
    logits: torch.Tensor

    def select(self, keep: list[int]) -> Prefilled:
        """Keeps only the rows `keep` (the cache in place)."""
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        return Prefilled(self.cache, self.mask.index_select(0, index), self.logits.index_select(0, index))


class BatchState:
    graph_bytes = 0  # memory of CUDA graphs captured on this batch's buffers (`static.StaticBatchState`)

    def __init__(self, *, max_rows: int = 64) -> None:
        self.max_rows = max_rows
        self.seqs: list[Sequence] = []
        self.kv: SlotKVCache | None = None
        self.mask: torch.Tensor | None = None
        # Whether any row has padding in the current step (set by `begin_step`).
        self.padded = False

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def cache(self) -> Any:
        assert self.kv is not None, "an empty batch has no cache"
        return self.kv.cache

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes if self.kv is not None else 0

    @property
    def tokens(self) -> list[int]:
        return [seq.next_token for seq in self.seqs]  # type: ignore[misc]

    def begin_step(self) -> None:
        """Adds the column the next step writes; decides from host lengths whether any row is padded."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.seqs), 1)], dim=1)
        shortest = min(seq.cached_positions for seq in self.seqs) + 1
        self.padded = shortest < self.mask.shape[1]

    def merge(self, seqs: list[Sequence], prefilled: Prefilled) -> None:
        if self.kv is None or not self.seqs:
            self.kv = SlotKVCache(prefilled.cache, spare_rows=max(0, min(8, self.max_rows - len(seqs))),
                                  max_rows=self.max_rows)
            self.mask, self.seqs = prefilled.mask, list(seqs)
            return
        assert self.mask is not None
        # Left-pad the shorter side: masked positions are never attended to and positions come from the mask, so a
        # row computes the same whichever batch it sits in.
        grown = self.kv.append(prefilled.cache)
        joining = F.pad(prefilled.mask, (self.kv.width - prefilled.mask.shape[1], 0))
        self.mask = torch.cat([F.pad(self.mask, (grown, 0)), joining])
        self.seqs.extend(seqs)

    def retain(self, keep: list[int]) -> None:
        """Keeps the rows at positions `keep` (ascending); rows from the end fill the holes."""
        if not keep:
            self.clear()
            return
        assert self.kv is not None and self.mask is not None
        order = self.kv.keep(keep)
        self.seqs = [self.seqs[i] for i in order]
        self.mask = self.mask[order]

    def trim(self) -> None:
        # Columns every row masks out (padding left behind by retired long prompts) cost attention time on every step.
        if self.mask is None or not self.seqs:
            return
        first = self.mask.shape[1] - max(seq.cached_positions for seq in self.seqs)
        if first > 0:
            assert self.kv is not None
            self.mask = self.mask[:, first:]
            self.kv.drop_front(first)

    def clear(self) -> None:
        self.seqs, self.kv, self.mask = [], None, None
