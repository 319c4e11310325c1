"""SlotKVCache against a plain per-row reference, through joins, steps, departures, trims and reallocations."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from blip2_triton.llm.kv_cache import SlotKVCache

HEADS, DIM, LAYERS = 2, 4, 3


def prefilled(rows: int, cols: int, gen: torch.Generator) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = []
    for _ in range(LAYERS):
        layer = DynamicLayer()
        layer.update(torch.randn(rows, HEADS, cols, DIM, generator=gen),
                     torch.randn(rows, HEADS, cols, DIM, generator=gen))
        cache.layers.append(layer)
    return cache


def rows_of(cache: DynamicCache) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per row, per layer: that row's (keys, values), every column its own."""
    n = cache.layers[0].keys.shape[0]
    return [[(layer.keys[r], layer.values[r]) for layer in cache.layers] for r in range(n)]


def check(slot: SlotKVCache, reference: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    assert slot.rows == len(reference)
    for layer_index, layer in enumerate(slot.cache.layers):
        assert layer.keys.shape[:2] == (len(reference), HEADS)
        assert layer.keys.shape[2] == slot.width == layer.get_seq_length()
        # Padding may hold zeros or another row's values, but never NaN/inf (masked attention multiplies it by 0).
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
        for r, row in enumerate(reference):
            keys, values = row[layer_index]
            own = keys.shape[1]
            assert own <= slot.width
            # Left padding: a row's newest position is always the last column.
            torch.testing.assert_close(layer.keys[r, :, slot.width - own:], keys, rtol=0, atol=0)
            torch.testing.assert_close(layer.values[r, :, slot.width - own:], values, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_slot_cache_matches_a_per_row_reference(seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    first = prefilled(rng.randint(1, 3), rng.randint(2, 6), gen)
    # Tiny spare room forces reallocation of both rows and columns along the way.
    slot = SlotKVCache(first, spare_rows=1, spare_cols=2)
    reference = rows_of(first)
    check(slot, reference)
    for _ in range(60):
        action = rng.choice(["step", "step", "join", "leave", "trim"])
        if action == "step" and reference:
            new = [(torch.randn(len(reference), HEADS, 1, DIM, generator=gen),
                    torch.randn(len(reference), HEADS, 1, DIM, generator=gen)) for _ in range(LAYERS)]
            for layer, (k, v) in zip(slot.cache.layers, new, strict=True):
                keys, values = layer.update(k, v)
                assert keys.shape[2] == values.shape[2] == slot.width
            reference = [[(torch.cat([row[i][0], new[i][0][r]], dim=1), torch.cat([row[i][1], new[i][1][r]], dim=1))
                          for i in range(LAYERS)] for r, row in enumerate(reference)]
        elif action == "join":
            group = prefilled(rng.randint(1, 3), rng.randint(1, slot.width + 3), gen)
            before = slot.width
            grown = slot.append(group)
            assert slot.width == before + grown
            reference += rows_of(group)
        elif action == "leave" and len(reference) > 1:
            keep = sorted(rng.sample(range(len(reference)), rng.randint(1, len(reference) - 1)))
            order = slot.keep(keep)
            assert sorted(order) == keep
            reference = [reference[i] for i in order]
        elif action == "trim":
            longest = max((row[0][0].shape[1] for row in reference), default=slot.width)
            slot.drop_front(slot.width - longest)
        check(slot, reference)


def test_rows_leaving_are_replaced_from_the_end() -> None:
    gen = torch.Generator().manual_seed(0)
    slot = SlotKVCache(prefilled(6, 3, gen))
    # Rows 1 and 3 leave: rows 4 and 5 move into their slots, rows 0 and 2 stay where they are.
    assert slot.keep([0, 2, 4, 5]) == [0, 4, 2, 5]


def test_unsupported_cache_layers_are_refused() -> None:
    cache = DynamicCache()
    layer = DynamicSlidingWindowLayer(sliding_window=4)
    layer.update(torch.zeros(1, HEADS, 2, DIM), torch.zeros(1, HEADS, 2, DIM))
    cache.layers = [layer]
    with pytest.raises(NotImplementedError, match="DynamicSlidingWindowLayer"):
        SlotKVCache(cache)


def test_buffers_stay_bounded_under_steady_traffic() -> None:
    # Sequences of 20 positions keep joining and leaving for 400 steps: the live width stays ~20 columns while
    # the absolute position keeps advancing, so only compaction keeps the buffers from growing without end.
    gen = torch.Generator().manual_seed(1)
    slot = SlotKVCache(prefilled(4, 5, gen), spare_rows=0, spare_cols=8, max_rows=6)
    ages = [0] * 4
    widest = 0
    for step in range(400):
        for layer in slot.cache.layers:
            layer.update(torch.randn(slot.rows, HEADS, 1, DIM, generator=gen),
                         torch.randn(slot.rows, HEADS, 1, DIM, generator=gen))
        ages = [a + 1 for a in ages]
        keep = [i for i, a in enumerate(ages) if a < 15]
        if len(keep) < len(ages):
            order = slot.keep(keep)
            ages = [ages[i] for i in order]
        if step % 3 == 0 and slot.rows < 6:
            slot.append(prefilled(1, 5, gen))
            ages.append(0)
        slot.drop_front(slot.width - (max(ages) + 5))
        widest = max(widest, slot.width)
        layer = slot.cache.layers[0]
        assert layer.kbuf.shape[0] <= 6
        assert layer.kbuf.shape[2] <= widest + 1 + max(8, (widest + 1) // 8)
