"""The vision stage's image-embedding cache: LRU by bytes, exact hits, disabled at 0, thread safety."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from blip2_triton.embedding_cache import ENTRY_OVERHEAD_BYTES, EmbeddingCache, _compact, _restore
from blip2_triton.errors import ConfigurationError, InvalidRequestError
from blip2_triton.options import ServerOptions
from blip2_triton.requests import ImageRequest
from blip2_triton.vision import VisionStage
from blip2_triton.vision import stage as vision


def _array(seed: int, shape: tuple[int, int] = (4, 8)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _cost(array: np.ndarray) -> int:
    return array.nbytes + ENTRY_OVERHEAD_BYTES


def test_lru_evicts_least_recently_used_to_stay_within_bytes() -> None:
    a, b, c = _array(1), _array(2), _array(3)
    cache = EmbeddingCache(2 * _cost(a), "m")
    cache.put(cache.key(b"a"), a)
    cache.put(cache.key(b"b"), b)
    assert cache.get(cache.key(b"a")) is not None  # a becomes the most recently used
    cache.put(cache.key(b"c"), c)
    assert cache.get(cache.key(b"b")) is None
    assert cache.get(cache.key(b"a")) is not None and cache.get(cache.key(b"c")) is not None
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 2 * _cost(a), 1)
    assert (stats.hits, stats.misses) == (3, 1)


def test_entry_larger_than_the_budget_is_not_stored() -> None:
    big = _array(1, (64, 64))
    cache = EmbeddingCache(_cost(big) - 1, "m")
    cache.put(cache.key(b"x"), big)
    assert len(cache) == 0 and cache.stats().bytes == 0


def test_hit_returns_exactly_the_stored_values() -> None:
    cache = EmbeddingCache(1 << 20, "m")
    value = _array(7)
    cache.put(cache.key(b"img"), value)
    hit = cache.get(cache.key(b"img"))
    assert hit is not None and hit.dtype == np.float32
    assert hit.tobytes() == value.tobytes()
    assert not hit.flags.writeable  # nobody can alter what later hits return


def test_a_stored_row_does_not_keep_its_batch_alive() -> None:
    batch = _array(5, (16 * 4, 8)).reshape(16, 4, 8)  # float32 values: stored as float32
    cache = EmbeddingCache(1 << 20, "m")
    cache.put(cache.key(b"row0"), batch[0])
    stored = cache._entries[cache.key(b"row0")]
    assert stored.base is None and stored.nbytes == batch[0].nbytes


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "float32"])
def test_compact_storage_restores_bit_identical_float32(kind: str) -> None:
    value = _array(3, (32, 64))
    if kind == "float16":
        value = value.astype(np.float16).astype(np.float32)
    elif kind == "bfloat16":
        value = (value.view(np.uint32) & 0xFFFF0000).view(np.float32)
    stored = _compact(value)
    assert stored.nbytes == (value.nbytes if kind == "float32" else value.nbytes // 2)
    assert _restore(stored).tobytes() == value.tobytes()


def test_keys_depend_on_model_identity_and_bytes() -> None:
    one, other = EmbeddingCache(1, "ckpt|torch.float32|none"), EmbeddingCache(1, "ckpt|torch.float16|none")
    assert one.key(b"img") == one.key(b"img")
    assert one.key(b"img") != other.key(b"img")
    assert one.key(b"img") != one.key(b"img2")


def test_zero_disables_and_negative_is_rejected() -> None:
    cache = EmbeddingCache(0, "m")
    cache.put(cache.key(b"a"), _array(1))
    assert not cache.enabled and cache.get(cache.key(b"a")) is None
    assert cache.stats().misses == 0  # a disabled cache reports no lookups at all
    with pytest.raises(ConfigurationError, match="embedding_cache_bytes must be >= 0"):
        EmbeddingCache(-1, "m")


def test_option_comes_from_the_environment() -> None:
    assert ServerOptions().embedding_cache_bytes == 256 * 1024 * 1024
    assert ServerOptions.resolve({}, env={"BLIP2_EMBEDDING_CACHE_BYTES": "0"}).embedding_cache_bytes == 0
    params = {"embedding_cache_bytes": "1024"}
    assert ServerOptions.resolve(params, env={}).embedding_cache_bytes == 1024


def test_concurrent_use_keeps_the_accounting_consistent() -> None:
    values = [_array(i) for i in range(16)]
    cache = EmbeddingCache(6 * _cost(values[0]), "m")
    lookups_per_thread = 400
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(lookups_per_thread):
            i = int(rng.integers(len(values)))
            key = cache.key(str(i).encode())
            hit = cache.get(key)
            if hit is None:
                cache.put(key, values[i])
            elif hit.tobytes() != values[i].tobytes():
                errors.append(f"entry {i} returned another value")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats()
    assert not errors
    assert stats.hits + stats.misses == 8 * lookups_per_thread
    assert stats.bytes == stats.entries * _cost(values[0]) <= cache.max_bytes
    assert stats.evictions > 0


@pytest.fixture(scope="module")
def tiny_options(tiny_model_dir: Path) -> ServerOptions:
    return ServerOptions(model_id=str(tiny_model_dir))


@pytest.fixture(scope="module")
def cached_stage(tiny_options: ServerOptions) -> VisionStage:
    return VisionStage(tiny_options)


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = vision.decode_image

    def counting(request: ImageRequest, options: ServerOptions):  # -> Image.Image
        calls[0] += 1
        return real(request, options)

    monkeypatch.setattr(vision, "decode_image", counting)
    return calls


def test_stage_hit_skips_decoding_and_returns_the_miss_result(
    cached_stage: VisionStage, sample_images: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    cached_stage.cache.clear()
    decodes = _count_decodes(monkeypatch)
    data = sample_images["rgb_jpeg"]
    (miss,) = cached_stage.run([ImageRequest(data)])
    before = cached_stage.cache.stats()
    (hit,) = cached_stage.run([ImageRequest(data)])
    after = cached_stage.cache.stats()
    assert decodes[0] == 1
    assert isinstance(miss, np.ndarray) and isinstance(hit, np.ndarray)
    assert hit.tobytes() == miss.tobytes()
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 0)


def test_stage_computes_a_repeated_image_once_per_batch(
    cached_stage: VisionStage, sample_images: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    cached_stage.cache.clear()
    decodes = _count_decodes(monkeypatch)
    a, b = sample_images["rgb_jpeg"], sample_images["rgba_png"]
    before = cached_stage.cache.stats()
    results = cached_stage.run([ImageRequest(a), ImageRequest(b), ImageRequest(a), ImageRequest(b"junk")])
    after = cached_stage.cache.stats()
    assert decodes[0] == 3  # a, b and the junk bytes (which fail); the second a is not decoded
    assert isinstance(results[3], InvalidRequestError)
    assert results[0].tobytes() == results[2].tobytes()  # type: ignore[union-attr]
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 3)
    assert after.entries == 2  # failed images are never cached


def test_stage_results_equal_with_and_without_cache(
    cached_stage: VisionStage, tiny_options: ServerOptions, sample_images: dict[str, bytes]
) -> None:
    from dataclasses import replace

    cached_stage.cache.clear()
    uncached = VisionStage(replace(tiny_options, embedding_cache_bytes=0), loaded=cached_stage.loaded)
    names = sorted(sample_images)[:4]
    requests = [ImageRequest(sample_images[n]) for n in names]
    want = uncached.run(requests)
    cached_stage.run(requests)  # fills the cache
    got = cached_stage.run(requests)  # all hits
    assert [g.tobytes() for g in got] == [w.tobytes() for w in want]  # type: ignore[union-attr]
    assert not uncached.cache.enabled and uncached.cache.stats().entries == 0


def test_oversized_image_is_rejected_before_hashing(cached_stage: VisionStage) -> None:
    limit = cached_stage.options.max_image_bytes
    (result,) = cached_stage.run([ImageRequest(b"\0" * (limit + 1))])
    assert isinstance(result, InvalidRequestError) and "bytes" in str(result)
