"""Image-text retrieval and matching served by a real tritonserver (`serve --itm`: the embedded tiny retrieval
checkpoint, beside the tiny captioning model) against transformers' Blip2ForImageTextRetrieval on the same
checkpoint, over gRPC and HTTP, one request at a time and batched."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from blip2_client import AsyncBlip2Client, Blip2Client, InvalidInputError
from reference import RETRIEVAL_ATOL as ATOL
from reference import RETRIEVAL_TEXTS as TEXTS
from triton_helpers import Clients, start_server
from tritonclient.utils import InferenceServerException

from blip2_triton.supervisor import TritonServer
from blip2_triton.tiny_itm import MAX_TEXT_POSITIONS

pytestmark = pytest.mark.integration

BLIP2 = Path(sys.executable).with_name("blip2")
# Rows per request in the batched checks: the public ensembles' max_batch_size.
MAX_ROWS = 16
INVALID = {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"}


@pytest.fixture(scope="module")
def itm_server(tiny_model_dir: Path, server_log_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    # A fresh cache directory: the retrieval stages generate the embedded tiny retrieval checkpoint themselves
    # (byte-identical to the fixture's, test_retrieval.py), while the captioning stages serve the tiny OPT model.
    server = start_server(server_log_dir, "retrieval", model_id=str(tiny_model_dir), with_itm=True,
                          cache_dir=str(tmp_path_factory.mktemp("itm-cache")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def itm_url(itm_server: TritonServer, protocol: str) -> str:
    return itm_server.grpc_url if protocol == "grpc" else itm_server.http_url


@pytest.fixture(scope="module")
def images(sample_images: dict[str, bytes]) -> list[bytes]:
    return [sample_images[n] for n in sorted(sample_images)]


@pytest.fixture(scope="module")
def hf(itm_reference, images: list[bytes]):  # -> Blip2ImageTextMatchingModelOutput
    return itm_reference.contrastive(images, list(TEXTS))


@pytest.fixture(scope="module")
def pairs(images: list[bytes]) -> list[tuple[int, int]]:
    return [(i, t) for i in range(len(images)) for t in range(len(TEXTS))]


@pytest.fixture(scope="module")
def hf_match(itm_reference, images: list[bytes], pairs: list[tuple[int, int]]) -> np.ndarray:
    return np.array(itm_reference.match([images[i] for i, _ in pairs], [TEXTS[t] for _, t in pairs]))


def _inputs(module: Any, image: list[bytes] | None, text: list[str] | None) -> list[Any]:
    tensors = []
    for name, rows in (("image", image), ("text_input", None if text is None else [t.encode() for t in text])):
        if rows is not None:
            tensor = module.InferInput(name, [len(rows), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[r] for r in rows], dtype=np.object_))
            tensors.append(tensor)
    return tensors


def _infer(client: Any, model: str, output: str, image: list[bytes] | None = None,
           text: list[str] | None = None) -> np.ndarray:
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    return client.infer(model, _inputs(module, image, text)).as_numpy(output)


class Served:
    """The four entry points over one protocol: single-row requests sent 8 at a time (so Triton batches them
    dynamically), or requests of up to MAX_ROWS rows."""

    def __init__(self, server: TritonServer, protocol: str) -> None:
        self.clients = Clients(protocol, server)
        self.pool = ThreadPoolExecutor(8)

    def one_by_one(self, model: str, output: str, image: list[bytes] | None, text: list[str] | None) -> np.ndarray:
        n = len(image if image is not None else text)  # type: ignore[arg-type]

        def row(i: int) -> np.ndarray:
            return _infer(self.clients.get(), model, output, None if image is None else [image[i]],
                          None if text is None else [text[i]])[0]

        return np.stack(list(self.pool.map(row, range(n))))

    def batched(self, model: str, output: str, image: list[bytes] | None, text: list[str] | None) -> np.ndarray:
        n = len(image if image is not None else text)  # type: ignore[arg-type]
        return np.concatenate([
            _infer(self.clients.get(), model, output, None if image is None else image[s:s + MAX_ROWS],
                   None if text is None else text[s:s + MAX_ROWS])
            for s in range(0, n, MAX_ROWS)
        ])

    def close(self) -> None:
        self.pool.shutdown()
        self.clients.close()


@pytest.fixture
def served(itm_server: TritonServer, protocol: str) -> Iterator[Served]:
    s = Served(itm_server, protocol)
    yield s
    s.close()


def _ranks(scores: np.ndarray, axis: int) -> np.ndarray:
    return np.argsort(-scores, axis=axis, kind="stable")


def test_outputs_equal_transformers_one_by_one_and_batched(
    served: Served, images: list[bytes], hf, pairs: list[tuple[int, int]], hf_match: np.ndarray
) -> None:
    pair_images, pair_texts = [images[i] for i, _ in pairs], [TEXTS[t] for _, t in pairs]
    for send in (served.one_by_one, served.batched):
        image_embeds = send("blip2_embed_image", "image_embeds", images, None)
        text_embeds = send("blip2_embed_text", "text_embeds", None, list(TEXTS))
        similarity = send("blip2_similarity", "similarity", pair_images, pair_texts)
        match = send("blip2_match", "match_probability", pair_images, pair_texts)
        assert image_embeds.dtype == text_embeds.dtype == similarity.dtype == match.dtype == np.float32
        np.testing.assert_allclose(image_embeds, hf.image_embeds.numpy(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(text_embeds, hf.text_embeds.numpy(), rtol=0, atol=ATOL)
        scores = similarity.reshape(len(images), len(TEXTS))
        want = hf.logits_per_image.numpy()
        np.testing.assert_allclose(scores, want, rtol=0, atol=ATOL)
        for axis in (0, 1):
            assert (_ranks(scores, axis) == _ranks(want, axis)).all()
        probs = match.reshape(len(images), len(TEXTS))
        want_probs = hf_match.reshape(len(images), len(TEXTS))
        np.testing.assert_allclose(probs, want_probs, rtol=0, atol=ATOL)
        assert ((probs > 0.5) == (want_probs > 0.5)).all()
        for axis in (0, 1):
            assert (_ranks(probs, axis) == _ranks(want_probs, axis)).all()


def test_bad_inputs_fail_alone_with_invalid_arg_naming_the_problem(
    served: Served, protocol: str, images: list[bytes], hf, hf_match: np.ndarray
) -> None:
    too_long = " ".join(["cat"] * MAX_TEXT_POSITIONS)  # [CLS] + words + [SEP] passes the checkpoint's positions
    good = [("blip2_similarity", (images[0],), (TEXTS[0],)), ("blip2_match", (images[1],), (TEXTS[1],)),
            ("blip2_embed_text", None, (TEXTS[2],)), ("blip2_embed_image", (images[3],), None)]
    bad = {
        ("blip2_similarity", (images[0],), None): "text_input",  # Triton's own check of a required input
        ("blip2_similarity", (images[0],), ("",)): "text_input: expected non-empty text, got an empty string",
        ("blip2_match", (b"junk",), (TEXTS[0],)): "image: bytes are not a supported image file",
        ("blip2_match", (images[1],), (too_long,)):
            f"text_input: expected at most {MAX_TEXT_POSITIONS} tokens, got {MAX_TEXT_POSITIONS + 2}",
        ("blip2_embed_text", None, ("   ",)): "text_input: expected non-empty text, got only whitespace",
        ("blip2_embed_image", (b"",), None): "image: expected encoded image bytes, got 0 bytes",
    }
    outputs = {"blip2_similarity": "similarity", "blip2_match": "match_probability",
               "blip2_embed_text": "text_embeds", "blip2_embed_image": "image_embeds"}

    def send(model: str, image: Any, text: Any) -> np.ndarray | InferenceServerException:
        try:
            return _infer(served.clients.get(), model, outputs[model], None if image is None else list(image),
                          None if text is None else list(text))
        except InferenceServerException as e:
            return e

    # All at once, good and bad interleaved, so Triton batches them together.
    jobs = [job for pair in zip(bad, good, strict=False) for job in pair] + list(bad)[len(good):]
    by_job = dict(zip(jobs, served.pool.map(lambda job: send(*job), jobs), strict=True))
    assert len(by_job) == len(bad) + len(good)
    for job, message in bad.items():
        error = by_job[job]
        assert isinstance(error, InferenceServerException), job
        assert error.status() == INVALID[protocol] and message in error.message(), (job, error.message())
    np.testing.assert_allclose(by_job[good[0]], hf.logits_per_image[:1, :1].numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(by_job[good[1]][0, 0], hf_match[1 * len(TEXTS) + 1], rtol=0, atol=ATOL)
    np.testing.assert_allclose(by_job[good[2]], hf.text_embeds[2:3].numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(by_job[good[3]], hf.image_embeds[3:4].numpy(), rtol=0, atol=ATOL)
    # Rows of one request share its single response: a bad row fails that request (and only it).
    error = send("blip2_embed_text", None, [TEXTS[0], ""])
    assert isinstance(error, InferenceServerException) and "text_input: expected non-empty text" in error.message()


def _cache_metrics(server: TritonServer) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    pattern = re.compile(r'^(blip2_(?:embedding|vision_features)_cache_\w+)\{[^}]*model="blip2_itm_vision"[^}]*\} '
                         r"(\S+)$", re.M)
    return {name: float(value) for name, value in pattern.findall(text)}


def test_a_repeated_image_is_a_cache_hit(itm_server: TritonServer, itm_reference) -> None:
    import io

    from PIL import Image

    pixels = np.random.default_rng(2501).integers(0, 256, size=(80, 100, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    image = buf.getvalue()  # bytes no other test sends
    client = grpcclient.InferenceServerClient(itm_server.grpc_url)
    try:
        start = _cache_metrics(itm_server)
        first = _infer(client, "blip2_embed_image", "image_embeds", [image])
        miss = _cache_metrics(itm_server)
        again = _infer(client, "blip2_embed_image", "image_embeds", [image])
        score = _infer(client, "blip2_similarity", "similarity", [image], [TEXTS[2]])
        prob = _infer(client, "blip2_match", "match_probability", [image], [TEXTS[2]])
        end = _cache_metrics(itm_server)
    finally:
        client.close()

    def delta(a: dict[str, float], b: dict[str, float], name: str) -> float:
        return b[name] - a[name]

    emb, feat = "blip2_embedding_cache_", "blip2_vision_features_cache_"
    # The first request runs the ViT (one miss in each cache) and keeps both outputs.
    assert (delta(start, miss, emb + "misses_total"), delta(start, miss, emb + "hits_total")) == (1, 0)
    assert (delta(start, miss, emb + "entries"), delta(start, miss, feat + "entries")) == (1, 1)
    # Embedding it again and scoring it: answered from the embedding cache; matching it: from the ViT-feature
    # cache. No miss, so no decoding and no vision compute.
    assert delta(miss, end, emb + "hits_total") == 2 and delta(miss, end, feat + "hits_total") == 1
    assert delta(miss, end, emb + "misses_total") == delta(miss, end, feat + "misses_total") == 0
    assert end[emb + "capacity_bytes"] == end[feat + "capacity_bytes"] > 0
    assert again.tobytes() == first.tobytes()
    hf = itm_reference.contrastive([image], [TEXTS[2]])
    np.testing.assert_allclose(first, hf.image_embeds.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(score, hf.logits_per_image.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(prob[0, 0], itm_reference.match([image], [TEXTS[2]])[0], rtol=0, atol=ATOL)


def test_client_methods_sync_and_async(itm_url: str, images: list[bytes], hf, hf_match: np.ndarray) -> None:
    chosen = [0, 5, 9]
    want_images = hf.image_embeds.numpy()[chosen]
    want_texts = hf.text_embeds.numpy()
    want_scores = hf.logits_per_image.numpy()[chosen, 2]
    want_probs = hf_match.reshape(len(images), len(TEXTS))[chosen, 2]
    picked = [images[i] for i in chosen]
    with Blip2Client(itm_url) as client:
        sync = [client.embed_image(picked[0]), client.embed_text(TEXTS[1]), client.similarity(picked[1], TEXTS[2]),
                client.match(picked[2], TEXTS[2]), client.embed_image_batch(picked),
                client.embed_text_batch(list(TEXTS)), client.similarity_batch(picked, TEXTS[2]),
                client.match_batch(picked, [TEXTS[2]] * 3)]
        with pytest.raises(InvalidInputError, match="text_input: expected non-empty text"):
            client.match(picked[0], "")

    async def run() -> list[Any]:
        async with AsyncBlip2Client(itm_url) as client:
            got = [await client.embed_image(picked[0]), await client.embed_text(TEXTS[1]),
                   await client.similarity(picked[1], TEXTS[2]), await client.match(picked[2], TEXTS[2]),
                   await client.embed_image_batch(picked), await client.embed_text_batch(list(TEXTS)),
                   await client.similarity_batch(picked, TEXTS[2]), await client.match_batch(picked, [TEXTS[2]] * 3)]
            with pytest.raises(InvalidInputError, match="image: bytes are not a supported image file"):
                await client.embed_image(b"junk")
            return got

    want = [want_images[0], want_texts[1], want_scores[1], want_probs[2], want_images, want_texts, want_scores,
            want_probs]
    for got in (sync, asyncio.run(run())):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=ATOL)


def _blip2(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BLIP2), *args], capture_output=True, text=True, timeout=300)


def _photo(root: Path, i: int) -> Path:
    return root / f"photo{i}.png" if i % 2 == 0 else root / "nested" / f"photo{i}.png"


def test_blip2_search_end_to_end(itm_server: TritonServer, images: list[bytes], hf, hf_match: np.ndarray,
                                 tmp_path: Path) -> None:
    root, store = tmp_path / "photos", tmp_path / "store.npz"
    (root / "nested").mkdir(parents=True)
    for i, data in enumerate(images[:8]):
        _photo(root, i).write_bytes(data)
    (root / "broken.jpg").write_bytes(b"not an image")
    query = 2  # "a red car"
    order = np.argsort(-hf.logits_per_image.numpy()[:8, query], kind="stable")

    first = _blip2("search", str(root), TEXTS[query], "--top-k", "5", "--cache", str(store),
                   "--url", itm_server.grpc_url)
    assert first.returncode == 3, first.stderr  # the broken file's invalid input, after the hits
    lines = [line.split("\t") for line in first.stdout.splitlines()]
    assert [Path(p) for _, p in lines] == [_photo(root, int(i)) for i in order[:5]]
    np.testing.assert_allclose([float(s) for s, _ in lines], hf.logits_per_image.numpy()[order[:5], query],
                               rtol=0, atol=1e-4)  # printed with 4 decimals
    assert "broken.jpg: in ensemble 'blip2_embed_image', image: bytes are not a supported image file" in first.stderr
    assert "embedding images: 9/9" in first.stderr

    (root / "broken.jpg").unlink()
    second = _blip2("search", str(root), TEXTS[query], "--top-k", "3", "--rerank", "4", "--json", "--cache",
                    str(store), "--url", itm_server.http_url)
    assert second.returncode == 0, second.stderr
    assert "embedding images" not in second.stderr, "every image came from the store"
    records = json.loads(second.stdout)
    probs = hf_match.reshape(len(images), len(TEXTS))[:, query]
    best = sorted(order[:4], key=lambda i: -probs[i])[:3]
    assert [Path(r["path"]) for r in records] == [_photo(root, int(i)) for i in best]
    np.testing.assert_allclose([r["match"] for r in records], probs[best], rtol=0, atol=ATOL)
    np.testing.assert_allclose([r["similarity"] for r in records], hf.logits_per_image.numpy()[best, query],
                               rtol=0, atol=ATOL)


def test_locust_retrieval_user_loads_every_entry_point(itm_server: TritonServer, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    run_data, texts = tmp_path / "run.json", tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS))  # within the tiny checkpoint's 32 text positions
    proc = subprocess.run([
        sys.executable, "-m", "locust", "-f", str(root / "loadtest" / "locustfile.py"),
        "--headless", "--only-summary", "--loglevel", "WARNING",
        "--host", itm_server.http_url, "--grpc-url", itm_server.grpc_url, "--metrics-url", itm_server.metrics_url,
        "--model-name", "blip2_embed_image", "--stage-models", "blip2_itm_vision,blip2_itm_text",
        "--retrieval-entries", "embed_image,embed_text,similarity,match", "--prompts-file", str(texts),
        "--step-users", "4", "--max-steps", "1", "--step-duration", "8", "--warmup", "2",
        "--request-timeout", "30", "--run-data", str(run_data), "Blip2RetrievalUser",
    ], capture_output=True, text=True, timeout=60, cwd=root)  # fmt: skip
    run = json.loads(run_data.read_text())
    failed = [row for row in run["samples"] if not row[2]]
    assert not failed and not run["errors"], f"{len(failed)} failed requests: {run['errors']}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert run["config"]["user_classes"] == ["Blip2RetrievalUser"]
    assert {row[4] for row in run["samples"]} == {"embed_image", "embed_text", "similarity", "match"}
