"""The vision stage's embedding cache in the real server: counters on the metrics port, identical text on hits."""

from __future__ import annotations

import io
import re
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image
from triton_helpers import infer

from blip2_triton.embedding_cache import DEFAULT_CACHE_BYTES

MODEL = "blip2_vision"


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    pattern = re.compile(r'^(blip2_embedding_cache_\w+)\{[^}]*model="' + MODEL + r'"[^}]*\} (\S+)$', re.M)
    return {name: float(value) for name, value in pattern.findall(text)}


def _fresh_image(seed: int) -> bytes:
    # Bytes no other test sends, so this test's first request is a guaranteed miss.
    pixels = np.random.default_rng(seed).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_counters_move_and_hits_keep_the_reference_text(triton_server, reference) -> None:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    image, prompt = _fresh_image(90210), "Question: what is in the picture? Answer:"
    start = _metrics(triton_server.metrics_url)
    assert start["blip2_embedding_cache_capacity_bytes"] == DEFAULT_CACHE_BYTES

    first = infer(client, image, None, max_tokens=10)
    after_miss = _metrics(triton_server.metrics_url)
    assert after_miss["blip2_embedding_cache_misses_total"] - start["blip2_embedding_cache_misses_total"] == 1
    assert after_miss["blip2_embedding_cache_hits_total"] == start["blip2_embedding_cache_hits_total"]
    assert after_miss["blip2_embedding_cache_entries"] == start["blip2_embedding_cache_entries"] + 1
    assert after_miss["blip2_embedding_cache_bytes"] > start["blip2_embedding_cache_bytes"]

    # Same image again, caption and a question: both answered from the cache, text unchanged.
    again = infer(client, image, None, max_tokens=10)
    answer = infer(client, image, prompt, max_tokens=10)
    end = _metrics(triton_server.metrics_url)
    assert end["blip2_embedding_cache_hits_total"] - after_miss["blip2_embedding_cache_hits_total"] == 2
    assert end["blip2_embedding_cache_misses_total"] == after_miss["blip2_embedding_cache_misses_total"]
    assert first == again == reference(image, None, 10)
    assert answer == reference(image, prompt, 10)
    client.close()
