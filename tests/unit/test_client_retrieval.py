"""Client retrieval methods against a fake transport, and `blip2 search` (store, ranking, CLI) without a server."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from blip2_client import (
    AsyncBlip2Client,
    Blip2Client,
    InvalidInputError,
    RetrievalModels,
    ServerUnavailableError,
    cli,
    similarity_scores,
)
from blip2_client._search import EmbeddingStore, Progress, content_key, default_store_path, probe_image, search
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

QUERIES, DIM = 3, 4


def _vector(seed: bytes, *shape: int) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(hashlib.blake2b(seed, digest_size=8).digest(), "little"))
    v = rng.normal(size=shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class _Result:
    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self.outputs = outputs

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.outputs.get(name)


class FakeServer:
    """Answers the four entry points as the server would, from deterministic fake embeddings; b"bad" is refused."""

    def __init__(self, *, is_async: bool = False) -> None:
        self.is_async = is_async
        self.calls: list[tuple[str, dict[str, bytes], list[str], dict[str, Any]]] = []

    def _answer(self, model: str, inputs: list[Any], outputs: list[Any], kw: dict[str, Any]) -> _Result:
        got = {i.name(): deserialize_bytes_tensor(i._get_content())[0] for i in inputs}
        self.calls.append((model, got, [o.name() for o in outputs], kw))
        if got.get("image") == b"bad":
            raise InferenceServerException(msg=f"in ensemble '{model}', image: bytes are not a supported image file",
                                           status="StatusCode.INVALID_ARGUMENT")
        image = _vector(got["image"], QUERIES, DIM) if "image" in got else None
        text = _vector(got["text_input"], DIM) if "text_input" in got else None
        (output,) = [o.name() for o in outputs]
        if output == "image_embeds":
            return _Result({output: image[None]})
        if output == "text_embeds":
            return _Result({output: text[None]})
        if output == "similarity":
            return _Result({output: np.array([[similarity_scores(image, text)]], np.float32)})
        return _Result({output: np.array([[len(got["text_input"]) / 100]], np.float32)})

    def infer(self, model_name: str, inputs: list[Any], outputs: Any = None, **kw: Any) -> Any:
        if self.is_async:
            async def coro() -> _Result:
                return self._answer(model_name, inputs, outputs, kw)

            return coro()
        return self._answer(model_name, inputs, outputs, kw)

    def close(self) -> Any:
        if self.is_async:
            async def done() -> None:
                return None

            return done()
        return None


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(Blip2Client, "_new_client", lambda self: fake)
    return fake


def test_methods_send_image_and_text_to_their_entry_points(server: FakeServer) -> None:
    models = RetrievalModels(embed_image="e_img", embed_text="e_txt", similarity="sim", match="itm")
    with Blip2Client("localhost:8001", timeout_s=9.0, retrieval_models=models) as client:
        image = client.embed_image(b"cat")
        text = client.embed_text("a cat ☃")
        score = client.similarity(b"cat", "a cat ☃", timeout_s=2.5)
        prob = client.match(b"cat", "a cat")
    np.testing.assert_array_equal(image, _vector(b"cat", QUERIES, DIM))
    np.testing.assert_array_equal(text, _vector("a cat ☃".encode(), DIM))
    assert image.dtype == text.dtype == np.float32
    assert score == pytest.approx(float(similarity_scores(image, text)), abs=1e-6) and prob == pytest.approx(0.05)
    assert [(m, sorted(inputs), outputs) for m, inputs, outputs, _ in server.calls] == [
        ("e_img", ["image"], ["image_embeds"]), ("e_txt", ["text_input"], ["text_embeds"]),
        ("sim", ["image", "text_input"], ["similarity"]), ("itm", ["image", "text_input"], ["match_probability"]),
    ]
    assert server.calls[1][1]["text_input"] == "a cat ☃".encode()
    assert [kw["client_timeout"] for *_, kw in server.calls] == [9.0, 9.0, 2.5, 9.0]


def test_batch_methods_return_arrays_in_input_order(server: FakeServer) -> None:
    with Blip2Client("localhost:8001", max_concurrency=3) as client:
        images = client.embed_image_batch([b"a", b"b", b"c", b"d"])
        texts = client.embed_text_batch(["x", "y"])
        scores = client.similarity_batch([b"a", b"b"], ["x", "y"])
        probs = client.match_batch([b"a", b"b", b"c"], "four")
        empty = client.embed_image_batch([])
    assert images.shape == (4, QUERIES, DIM) and texts.shape == (2, DIM)
    np.testing.assert_array_equal(images[2], _vector(b"c", QUERIES, DIM))
    np.testing.assert_allclose(scores, [similarity_scores(images[0], texts[0]), similarity_scores(images[1], texts[1])],
                               atol=1e-6)
    assert probs.shape == (3,)
    np.testing.assert_allclose(probs, [0.04] * 3)
    assert empty.shape == (0, 0, 0)
    with pytest.raises(ValueError, match="got 2 images but 1 texts"):
        Blip2Client("localhost:8001").match_batch([b"a", b"b"], ["x"])


def test_bad_arguments_fail_before_sending_and_server_errors_are_mapped(server: FakeServer) -> None:
    client = Blip2Client("localhost:8001")
    with pytest.raises(TypeError, match="text must be str, got bytes"):
        client.embed_text(b"a cat")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text must be str, got NoneType"):
        client.match_batch([b"a"], [None])  # type: ignore[list-item]
    assert server.calls == []
    with pytest.raises(InvalidInputError, match="image: bytes are not a supported image file") as info:
        client.similarity(b"bad", "x")
    assert isinstance(info.value.__cause__, InferenceServerException)


def test_async_twins_equal_the_sync_methods(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeServer(is_async=True)
    monkeypatch.setattr(AsyncBlip2Client, "_client", lambda self: fake)

    async def run() -> list[Any]:
        async with AsyncBlip2Client("localhost:8001") as client:
            return [await client.embed_image(b"a"), await client.embed_text("x"), await client.similarity(b"a", "x"),
                    await client.match(b"a", "xy"), await client.embed_image_batch([b"a", b"b"]),
                    await client.embed_text_batch(["x"]), await client.similarity_batch([b"a"], "x"),
                    await client.match_batch([b"a", b"b"], ["x", "xy"])]

    got = asyncio.run(run())
    with Blip2Client("localhost:8001") as client:
        want = [client.embed_image(b"a"), client.embed_text("x"), client.similarity(b"a", "x"),
                client.match(b"a", "xy"), client.embed_image_batch([b"a", b"b"]), client.embed_text_batch(["x"]),
                client.similarity_batch([b"a"], "x"), client.match_batch([b"a", b"b"], ["x", "xy"])]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_similarity_scores_is_the_max_over_queries() -> None:
    images, texts = _vector(b"i", 5, QUERIES, DIM), _vector(b"t", 2, DIM)
    scores = similarity_scores(images, texts)
    want = np.array([[max(float(q @ t) for q in image) for t in texts] for image in images])
    np.testing.assert_allclose(scores, want, atol=1e-6)
    assert similarity_scores(images[1], texts).shape == (2,) and similarity_scores(images, texts[0]).shape == (5,)
    assert np.ndim(similarity_scores(images[0], texts[0])) == 0
    with pytest.raises(ValueError, match="of the same dim"):
        similarity_scores(images, np.zeros((2, DIM + 1)))


# --- blip2 search ------------------------------------------------------------------------------------------------


class SearchClient:
    """What `search` uses of Blip2Client, counting embeddings; a checkpoint is a seed for the fake embeddings."""

    max_concurrency = 2
    retrieval_models = RetrievalModels()

    def __init__(self, checkpoint: bytes = b"ckpt") -> None:
        self.checkpoint = checkpoint
        self.embedded: list[bytes] = []

    def embed_image(self, image: bytes) -> np.ndarray:
        if image.startswith(b"bad"):
            raise InvalidInputError("in ensemble 'blip2_embed_image', image: bytes are not a supported image file")
        if image == b"down":
            raise ServerUnavailableError("connection refused")
        self.embedded.append(image)
        return _vector(self.checkpoint + image, QUERIES, DIM)

    def embed_text(self, text: str) -> np.ndarray:
        return _vector(self.checkpoint + text.encode(), DIM)

    def match_batch(self, images: list[bytes], text: str) -> np.ndarray:
        # The reranker prefers short files.
        return np.array([1 / len(i) for i in images], np.float32)

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        (root / f"p{i}.jpg").write_bytes(b"image %d" % i + b"x" * i)
    (root / "sub" / "copy.PNG").write_bytes(b"image 0")  # same content as p0.jpg
    (root / "notes.txt").write_bytes(b"not an image, not listed")
    (root / "sub" / "broken.webp").write_bytes(b"bad bytes")
    return root


def _ranking(client: SearchClient, root: Path, query: str) -> list[str]:
    text = client.embed_text(query)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    scores = [float(similarity_scores(_vector(client.checkpoint + p.read_bytes(), QUERIES, DIM), text))
              for p in files]
    return [str(files[i]) for i in np.argsort(-np.array(scores), kind="stable")]


def test_search_ranks_by_similarity_and_reuses_the_store(photos: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "store.npz"
    client = SearchClient()
    first = search(client, photos, "a dog", store=EmbeddingStore(store_path), top_k=4, progress=io.StringIO())
    assert [h.path for h in first.hits] == _ranking(client, photos, "a dog")[:4]
    assert [h.similarity for h in first.hits] == sorted((h.similarity for h in first.hits), reverse=True)
    # Copies are embedded once; the broken file is reported and skipped; the probe fingerprints the checkpoint.
    assert (first.embedded, first.cached) == (6, 0)
    assert [(p, type(e)) for p, e in first.failures] == [(str(photos / "sub" / "broken.webp"), InvalidInputError)]
    assert len(client.embedded) == 1 + 6 and client.embedded[0] == probe_image()

    again = SearchClient()
    second = search(again, photos, "a dog", store=EmbeddingStore(store_path), top_k=4, progress=io.StringIO())
    assert second.hits == first.hits and (second.embedded, second.cached) == (0, 7)
    assert again.embedded == [probe_image()], "only the probe: every image came from the store"
    # An edited file misses; a new checkpoint empties the store.
    (photos / "p3.jpg").write_bytes(b"edited")
    third = search(SearchClient(), photos, "a dog", store=EmbeddingStore(store_path), top_k=4, progress=io.StringIO())
    assert third.embedded == 1
    other = SearchClient(b"another checkpoint")
    store = EmbeddingStore(store_path)
    result = search(other, photos, "a dog", store=store, top_k=10, progress=io.StringIO())
    assert result.embedded == 6 and store.dropped_reason == "the server's checkpoint changed"
    assert [h.path for h in result.hits] == _ranking(other, photos, "a dog")


def test_rerank_orders_the_best_by_match_probability(photos: Path) -> None:
    result = search(SearchClient(), photos, "a dog", store=None, top_k=3, rerank=5, progress=io.StringIO())
    head = result.hits
    assert len(head) == 3 and all(h.match is not None for h in head)
    assert [h.match for h in head] == sorted((h.match for h in head), reverse=True)
    by_similarity = _ranking(SearchClient(), photos, "a dog")[:5]
    assert {h.path for h in head} <= set(by_similarity)


def test_a_fatal_error_keeps_what_was_embedded(photos: Path, tmp_path: Path) -> None:
    (photos / "p5.jpg").write_bytes(b"down")
    store_path = tmp_path / "store.npz"
    with pytest.raises(ServerUnavailableError):
        search(SearchClient(), photos, "a dog", store=EmbeddingStore(store_path), top_k=3, progress=io.StringIO())
    saved = EmbeddingStore(store_path)
    assert saved.fingerprint is not None and 0 < len(saved.entries) <= 5
    assert set(saved.entries) <= {content_key(p) for p in photos.glob("p*.jpg")}


def test_store_file_is_replaced_atomically_and_survives_garbage(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "store.npz"
    store = EmbeddingStore(path)
    store.check_fingerprint(np.ones((QUERIES, DIM), np.float32))
    store.entries["k"] = np.zeros((QUERIES, DIM), np.float32)
    store.save()
    assert [p.name for p in path.parent.iterdir()] == ["store.npz"]
    assert set(EmbeddingStore(path).entries) == {"k"}
    # Within tolerance of the stored fingerprint: same checkpoint.
    assert EmbeddingStore(path).check_fingerprint(np.ones((QUERIES, DIM), np.float32) + 1e-4)
    path.write_bytes(b"truncated")
    broken = EmbeddingStore(path)
    assert broken.entries == {} and broken.dropped_reason.startswith("unreadable")
    assert default_store_path("http://host:8000", "blip2_embed_image").name == "http_host_8000_blip2_embed_image.npz"


def test_progress_bar_on_a_terminal_and_one_line_elsewhere() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        bar = Progress(4, stream, "embedding images", width=4)
        for _ in range(4):
            bar.step()
        bar.close()
    assert "\rembedding images [##..] 2/4" in tty.getvalue() and tty.getvalue().endswith("embedding images: 4/4\n")
    assert log.getvalue() == "embedding images: 4/4\n"


def test_search_cli_prints_score_tab_path_and_json(photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "Blip2Client", lambda url, **options: SearchClient())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    code = cli.main(["search", str(photos), "a dog", "--top-k", "2"])
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.splitlines()]
    assert code == cli.EXIT_INVALID_INPUT  # the broken file's, after printing the hits
    assert [path for _, path in lines] == _ranking(SearchClient(), photos, "a dog")[:2]
    assert all(float(score) <= 1 for score, _ in lines)
    assert f"blip2: {photos / 'sub' / 'broken.webp'}: in ensemble 'blip2_embed_image', image:" in err
    assert list((tmp_path / "xdg" / "blip2-client" / "embeddings").iterdir()), "the default store was written"

    (photos / "sub" / "broken.webp").unlink()
    assert cli.main(["search", str(photos), "a dog", "--json", "--rerank", "2", "--top-k", "1", "--no-cache"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert set(record) == {"path", "similarity", "match"}
    assert cli.main(["search", str(tmp_path / "missing"), "a dog"]) == cli.EXIT_USAGE
    with pytest.raises(SystemExit) as info:
        cli.main(["search", str(photos), "a dog", "--top-k", "0"])
    assert info.value.code == cli.EXIT_USAGE
