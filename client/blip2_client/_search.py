"""`blip2 search`: embed a folder of images once, then rank it against a text query.

Image embeddings are kept in a local file keyed by the BLAKE2b-256 of each file's bytes (a renamed or copied file
hits, an edited one misses). The file is tied to the checkpoint the server runs by a fingerprint: the embedding of
a fixed probe image, taken at every search. When the server answers the probe differently (another checkpoint,
dtype or quantisation), the stored embeddings are dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ._errors import Blip2Error, InvalidInputError
from ._retrieval import similarity_scores

if TYPE_CHECKING:
    from ._sync import Blip2Client

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
# A checkpoint, dtype or quantisation change moves normalised embeddings by far more; float noise of the server's
# batch composition (fp16 on a GPU included) stays below it.
FINGERPRINT_ATOL = 1e-3
_CHUNK = 1 << 20


def content_key(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=32)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def image_files(root: Path) -> list[Path]:
    """Image files under `root` (by suffix, any depth, symlinked directories not followed), sorted."""
    if root.is_file():
        return [root]
    found = [Path(d) / name for d, _, names in os.walk(root) for name in names
             if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def probe_image() -> bytes:
    """The fixed image whose embedding fingerprints the server's checkpoint: a PNG of gradients (the server
    embeds decoded pixels, so an encoder that writes other bytes for them changes nothing)."""
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def default_store_path(url: str, model: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{url}_{model}").strip("_")
    return base / "blip2-client" / "embeddings" / f"{name}.npz"


class EmbeddingStore:
    """Image embeddings by content key, in one .npz file written atomically (temp file, then rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fingerprint: npt.NDArray[np.float32] | None = None
        self.entries: dict[str, npt.NDArray[np.float32]] = {}
        self.dropped_reason = ""
        self._load()

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                keys, embeds, fingerprint = data["keys"], data["embeds"], data["fingerprint"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError) as e:
            # A truncated or foreign file only costs recomputing the embeddings.
            self.dropped_reason = f"unreadable ({e})"
            return
        self.fingerprint = np.asarray(fingerprint, dtype=np.float32)
        self.entries = {str(k): np.asarray(e, dtype=np.float32) for k, e in zip(keys, embeds, strict=True)}

    def check_fingerprint(self, fingerprint: npt.NDArray[np.float32]) -> bool:
        """Keeps the entries if they came from a server that embeds the probe as `fingerprint` does; else drops
        them. True when they were kept."""
        fingerprint = np.asarray(fingerprint, dtype=np.float32)
        stored = self.fingerprint
        same = (stored is not None and stored.shape == fingerprint.shape
                and bool(np.allclose(stored, fingerprint, rtol=0, atol=FINGERPRINT_ATOL)))
        if not same and self.entries:
            self.dropped_reason = "the server's checkpoint changed"
            self.entries = {}
        self.fingerprint = fingerprint
        return same

    def save(self) -> None:
        if self.fingerprint is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.entries)
        shape = (0, *self.fingerprint.shape)
        embeds = np.stack([self.entries[k] for k in keys]) if keys else np.zeros(shape, np.float32)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, keys=np.array(keys, dtype=np.str_), embeds=embeds, fingerprint=self.fingerprint)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class Progress:
    """A progress bar on a terminal; elsewhere (logs, pipes) one line when done."""

    def __init__(self, total: int, stream: IO[str], label: str, *, width: int = 30) -> None:
        self.total, self.stream, self.label, self.width = total, stream, label, width
        self.done = 0
        self.tty = bool(getattr(stream, "isatty", lambda: False)())

    def step(self) -> None:
        self.done += 1
        if self.tty:
            filled = self.width * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total}")
            self.stream.flush()

    def close(self) -> None:
        if self.total:
            self.stream.write(("\n" if self.tty else "") + f"{self.label}: {self.done}/{self.total}\n")
            self.stream.flush()


@dataclass(frozen=True)
class Hit:
    path: str
    similarity: float
    match: float | None = None


@dataclass
class SearchResult:
    hits: list[Hit]
    # (path, error) of each image that could not be read or embedded, in walk order.
    failures: list[tuple[str, Blip2Error | OSError]]
    embedded: int
    cached: int


def search(
    client: Blip2Client, root: Path, query: str, *, store: EmbeddingStore | None, top_k: int, rerank: int = 0,
    progress: IO[str] = sys.stderr,
) -> SearchResult:
    """Ranks the images under `root` by contrastive similarity to `query`; with `rerank` > 0 the best `rerank` are
    scored by the matching head and ordered by it (BLIP-2 retrieves with ITC and re-ranks with ITM).

    Invalid images (the server's InvalidInputError) and unreadable files are skipped and reported in `failures`;
    any other error ends the search (the store keeps what was embedded so far)."""
    if store is not None:
        store.check_fingerprint(client.embed_image(probe_image()))
    known = dict(store.entries) if store is not None else {}
    text = client.embed_text(query)
    errors: dict[str, Blip2Error | OSError] = {}  # by path, or by content key for embedding errors
    keyed: list[tuple[Path, str]] = []
    missing: dict[str, Path] = {}  # content key -> the first file with it
    files = image_files(root)
    for path in files:
        try:
            key = content_key(path)
        except OSError as e:
            errors[str(path)] = e
            continue
        keyed.append((path, key))
        if key not in known:
            missing.setdefault(key, path)
    embeds = _embed_all(client, missing, errors, Progress(len(missing), progress, "embedding images"), store)
    key_of = dict(keyed)
    failures = [(str(path), error) for path in files
                if (error := errors.get(str(path)) or errors.get(key_of.get(path, ""))) is not None]
    found = [(path, key) for path, key in keyed if key in known or key in embeds]
    cached = sum(1 for _, key in keyed if key in known)
    if not found:
        return SearchResult([], failures, len(embeds), cached)
    scores = similarity_scores(np.stack([known.get(key, embeds.get(key)) for _, key in found]), text)
    ranked = np.argsort(-scores, kind="stable")[: max(top_k, rerank)]
    hits = [Hit(str(found[i][0]), float(scores[i])) for i in ranked]
    if rerank > 0:
        head = hits[:rerank]
        probs = client.match_batch([Path(h.path).read_bytes() for h in head], query)
        rescored = [Hit(h.path, h.similarity, float(p)) for h, p in zip(head, probs, strict=True)]
        hits = sorted(rescored, key=lambda h: -(h.match or 0.0)) + hits[rerank:]
    return SearchResult(hits[:top_k], failures, len(embeds), cached)


def _embed_all(client: Blip2Client, missing: dict[str, Path], errors: dict[str, Blip2Error | OSError],
               bar: Progress, store: EmbeddingStore | None) -> dict[str, npt.NDArray[np.float32]]:
    """Embeds one file per content key, `max_concurrency` at a time; what was embedded goes into the store (and
    its file) even when a fatal error ends the loop."""
    embeds: dict[str, npt.NDArray[np.float32]] = {}
    try:
        with ThreadPoolExecutor(max(1, client.max_concurrency)) as pool:
            futures = {pool.submit(lambda p: client.embed_image(p.read_bytes()), path): key
                       for key, path in missing.items()}
            try:
                for future in as_completed(futures):
                    try:
                        embeds[futures[future]] = future.result()
                    except (InvalidInputError, OSError) as e:
                        errors[futures[future]] = e
                    bar.step()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()
        if store is not None:
            store.entries.update(embeds)
            store.save()
    return embeds
