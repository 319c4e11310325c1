"""Image-embedding cache of the vision stage: encoded image bytes -> projected query embeddings.

Identical bytes under the same model always give the same embeddings, so a hit can skip decoding and the
ViT + Q-Former compute entirely. The cache is an LRU bounded in bytes and safe to share between threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .errors import ConfigurationError

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
# Per-entry bookkeeping (dict slot, key, array header) counted against the budget, so a flood of tiny
# entries cannot grow the process far beyond the configured size.
ENTRY_OVERHEAD_BYTES = 256


@dataclass(frozen=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    capacity_bytes: int = 0


def _compact(array: np.ndarray) -> np.ndarray:
    """The narrowest form that restores to exactly `array` (float32).

    The stage emits FP32, but an fp16 or bf16 model's values carry at most 16 significant bits: storing
    them in 16 bits doubles what the cache holds while `_restore` still returns bit-identical values.
    """
    array = np.ascontiguousarray(array, dtype=np.float32)
    bits = array.view(np.uint32)
    if not (bits & 0xFFFF).any():
        return (bits >> 16).astype(np.uint16)  # bfloat16 values: the low half of each float is zero
    if np.isfinite(array).all():
        half = array.astype(np.float16)
        if np.array_equal(half.astype(np.float32), array):
            return half
    # A copy: a row of the stage's batch output is a view, and storing it would keep the whole batch alive while
    # the budget counts one row (16x the budget with batches of 16); nor may the caller's array turn read-only.
    return array.copy()


def _restore(stored: np.ndarray) -> np.ndarray:
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if stored.dtype == np.float16:
        return stored.astype(np.float32)
    return stored


class EmbeddingCache:
    def __init__(self, max_bytes: int, identity: str) -> None:
        if max_bytes < 0:
            raise ConfigurationError(f"embedding_cache_bytes must be >= 0 (0 disables it), got {max_bytes}")
        self.max_bytes = max_bytes
        # The model identity is part of every key: embeddings of another checkpoint, dtype or quantisation
        # differ, and a key must never match across them.
        self._salt = hashlib.blake2b(identity.encode(), digest_size=16).digest()
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def key(self, data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=32, key=self._salt).digest()

    @staticmethod
    def _cost(stored: np.ndarray) -> int:
        return stored.nbytes + ENTRY_OVERHEAD_BYTES

    def get(self, key: bytes) -> np.ndarray | None:
        if not self.enabled:
            return None
        with self._lock:
            stored = self._entries.get(key)
            if stored is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
        return _restore(stored)

    def count_hit(self) -> None:
        """A lookup answered without `get` (the same image twice in one batch, computed once)."""
        with self._lock:
            self._hits += 1

    def put(self, key: bytes, array: np.ndarray) -> None:
        if not self.enabled:
            return
        stored = _compact(array)
        stored.setflags(write=False)
        cost = self._cost(stored)
        if cost > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self._cost(old)
            self._entries[key] = stored
            self._bytes += cost
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= self._cost(evicted)
                self._evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                bytes=self._bytes,
                entries=len(self._entries),
                capacity_bytes=self.max_bytes,
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
