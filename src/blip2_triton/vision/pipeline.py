"""The served image stages: images decode on a pool of threads while one compute thread embeds whatever is ready.

A request never waits for another's decoding: a huge image occupies one decoder thread while the others, and the
model, go on with the rest. Decoders take the smallest waiting image first (waiting ones age into FIFO order), and the
pixels being decoded at once stay under a budget, which bounds the memory decoded images take. Identical rows in
flight are decoded and embedded once.

The pipeline serves any `PipelineStage`: the captioning `VisionStage` and the retrieval image stage.
"""

from __future__ import annotations

import io
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from ..errors import InvalidRequestError
from ..options import ServerOptions

log = logging.getLogger(__name__)

# A row's result (the stage's, e.g. an embedding array) or the error that belongs to that row alone.
RowResult = Any
# Receives one result per row of a submitted request, once all rows are done.
OnDone = Callable[[list[RowResult]], None]


class PipelineStage(Protocol):
    """What the pipeline needs of a stage. A row is an image request with the encoded image in `data`."""

    options: ServerOptions

    def lookup(self, row: Any) -> tuple[Hashable | None, Any]:
        """Validates the row (raising InvalidRequestError) and returns (key, cached result or None). Rows with
        equal keys get one computation while in flight; None: never shared."""
        ...

    def joined(self, row: Any) -> None:
        """The row joined an identical one in flight (a cache hit, for the counters)."""
        ...

    def prepare(self, row: Any) -> Any:
        """The row's input to `embed_batch` (decoded pixels); runs on the decoder threads."""
        ...

    def embed_batch(self, items: Sequence[tuple[Hashable | None, Any, Any]]) -> Sequence[RowResult]:
        """One result per (key, row, prepared) of a batch, cached as the stage caches; runs on the compute thread."""
        ...


def declared_pixels(data: bytes) -> int:
    """Width x height from the file header (no decoding); 0 when unreadable (the decoder then fails fast)."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
        return int(width) * int(height)
    except Exception:
        return 0


@dataclass(frozen=True)
class _Unique:
    """The in-flight token of a row that shares with no other."""

    n: int


@dataclass(eq=False)
class _Request:
    rows: list[RowResult | None]
    pending: int
    on_done: OnDone


@dataclass(eq=False)
class _Decode:
    key: object
    request: Any
    pixels: int
    queued_at: float = field(default_factory=time.monotonic)


class DecodeQueue:
    """Smallest image first among those that fit the pixel budget; an image that waited `aging_s` goes first."""

    def __init__(self, budget_pixels: int, *, aging_s: float = 1.0) -> None:
        self.budget_pixels, self.aging_s = budget_pixels, aging_s
        self.in_flight = 0
        self._waiting: list[_Decode] = []
        self._cond = threading.Condition()
        self._closed = False

    def put(self, task: _Decode) -> None:
        with self._cond:
            self._waiting.append(task)
            self._cond.notify()

    def _pick(self) -> _Decode | None:
        now = time.monotonic()
        fits = [t for t in self._waiting
                if self.in_flight == 0 or self.in_flight + t.pixels <= self.budget_pixels]
        if not fits:
            return None
        aged = [t for t in fits if now - t.queued_at >= self.aging_s]
        return min(aged, key=lambda t: t.queued_at) if aged else min(fits, key=lambda t: t.pixels)

    def get(self) -> _Decode | None:
        """The next task (its pixels counted in flight until `done`), or None once closed."""
        with self._cond:
            while not self._closed:
                task = self._pick()
                if task is not None:
                    self._waiting.remove(task)
                    self.in_flight += task.pixels
                    return task
                self._cond.wait(timeout=self.aging_s)
            return None

    def done(self, task: _Decode) -> None:
        with self._cond:
            self.in_flight -= task.pixels
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class VisionPipeline:
    def __init__(self, stage: PipelineStage, *, decode_threads: int = 2, max_batch: int = 16,
                 budget_pixels: int | None = None, on_batch: Callable[[], None] | None = None) -> None:
        self.stage = stage
        self.max_batch = max_batch
        # Called on the compute thread after every batch, before its rows are answered (metrics export).
        self.on_batch = on_batch
        self._decodes = DecodeQueue(budget_pixels or 2 * stage.options.max_image_pixels)
        self._ready: queue.Queue[tuple[object, Any, Any] | None] = queue.Queue()
        # Cache key (or a unique token without a cache) -> the rows waiting for that image.
        self._waiters: dict[object, list[tuple[_Request, int]]] = {}
        self._lock = threading.Lock()
        self._unique = itertools.count()
        self._threads = [threading.Thread(target=self._decode_loop, name=f"blip2-vision-decode-{i}", daemon=True)
                         for i in range(decode_threads)]
        self._threads.append(threading.Thread(target=self._compute_loop, name="blip2-vision-compute", daemon=True))
        for thread in self._threads:
            thread.start()

    def submit(self, requests: Sequence[Any], on_done: OnDone) -> None:
        """Starts every row of one request; `on_done` gets their results (on a pipeline thread, or this one)."""
        request = _Request([None] * len(requests), len(requests), on_done)
        looked: list[tuple[Hashable | None, Any] | InvalidRequestError] = []
        for image in requests:
            try:
                looked.append(self.stage.lookup(image))
            except InvalidRequestError as e:
                looked.append(e)
        # Only rows that will be decoded count (not cache hits nor refused rows).
        pixels = [declared_pixels(image.data) if isinstance(entry, tuple) and entry[1] is None else 0
                  for image, entry in zip(requests, looked, strict=True)]
        limit = self.stage.options.max_request_pixels
        if sum(pixels) > limit:
            # Bounded decoding work per request: past this a request would crowd out the decoders for seconds.
            error = InvalidRequestError(f"image: expected at most {limit} pixels in one request, got {sum(pixels)}")
            looked = [error] * len(requests)
        for row, (image, entry) in enumerate(zip(requests, looked, strict=True)):
            if isinstance(entry, InvalidRequestError):
                self._resolve_row(request, row, entry)
                continue
            key, cached = entry
            if cached is not None:
                self._resolve_row(request, row, cached)
                continue
            token: object = key if key is not None else _Unique(next(self._unique))
            with self._lock:
                joined = token in self._waiters
                self._waiters.setdefault(token, []).append((request, row))
            if joined:
                self.stage.joined(image)
            else:
                self._decodes.put(_Decode(token, image, pixels[row]))

    def stop(self) -> None:
        self._decodes.close()
        self._ready.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    def _decode_loop(self) -> None:
        while (task := self._decodes.get()) is not None:
            try:
                pixels = self.stage.prepare(task.request)
            except Exception as e:
                if not isinstance(e, InvalidRequestError):
                    log.exception("decoding an image failed")
                self._resolve(task.key, e)
                continue
            finally:
                self._decodes.done(task)
            self._ready.put((task.key, task.request, pixels))

    def _compute_loop(self) -> None:
        while (first := self._ready.get()) is not None:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._ready.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._ready.put(None)
                    break
                batch.append(item)
            items = [(None if isinstance(key, _Unique) else key, row, pixels) for key, row, pixels in batch]
            try:
                results: list[RowResult] = list(self.stage.embed_batch(items))
            except Exception as e:
                log.exception("vision batch of %d images failed", len(batch))
                results = [e] * len(batch)
            # Before answering: a client that reads the metrics after its response sees its batch counted.
            if self.on_batch is not None:
                try:
                    self.on_batch()
                except Exception:
                    log.exception("vision batch hook failed")
            for (key, _, _), result in zip(batch, results, strict=True):
                self._resolve(key, result)

    def _resolve(self, token: object, result: RowResult) -> None:
        with self._lock:
            waiters = self._waiters.pop(token, [])
        for request, row in waiters:
            self._resolve_row(request, row, result)

    def _resolve_row(self, request: _Request, row: int, result: RowResult) -> None:
        with self._lock:
            request.rows[row] = result
            request.pending -= 1
            finished = request.pending == 0
        if finished:
            try:
                request.on_done(request.rows)  # type: ignore[arg-type]
            except Exception:
                log.exception("answering a vision request failed")
