"""Text streams of the LLM stage, read by long polling.

`blip2_llm` is a plain (non-decoupled) model: the `blip2` ensemble calls it with ordinary infer, and the
Python backend stub proved unsafe with decoupled BLS response iterators under load on Triton 2.51 (a front end
collecting decoupled BLS streams segfaulted inside libpython). Streaming therefore works without decoupled BLS:
the `blip2_stream` front end starts a job, then sends poll requests; each poll is answered as soon as new
text exists (or the job ends, or `poll_timeout_s` passes so the front end can check for cancellation).

Nothing here imports Triton: replies are plain callables. Replies are always made outside the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import InvalidRequestError

# Text since the previous reply, and how the stream ended: None while it runs, else its result (an exception when it
# failed or was cancelled).
Reply = Callable[[str, object | None], None]


class UnknownStreamError(InvalidRequestError):
    """A poll or cancel named a stream this process does not hold (never started, already read, or expired)."""


@dataclass
class _Stream:
    pending: str = ""
    end: object | None = None
    waiter: Reply | None = None
    waiter_since: float = 0.0
    touched: float = field(default_factory=time.monotonic)


class StreamHub:
    def __init__(self, *, poll_timeout_s: float = 0.5, abandon_after_s: float = 120.0) -> None:
        self.poll_timeout_s = poll_timeout_s
        # A stream nobody has polled for this long is dropped (its front end died or gave up).
        self.abandon_after_s = abandon_after_s
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._streams)

    def open(self, stream_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            if stream_id in self._streams:
                raise InvalidRequestError(f"_job_id: stream {stream_id!r} already exists")
            for key in [k for k, s in self._streams.items() if s.waiter is None
                        and now - s.touched > self.abandon_after_s]:
                del self._streams[key]
            self._streams[stream_id] = _Stream(touched=now)

    def piece(self, stream_id: str, text: str) -> None:
        self._update(stream_id, text, None)

    def finish(self, stream_id: str, result: object) -> None:
        # The final text was already streamed piece by piece; the result says how it ended.
        self._update(stream_id, "", result)

    def _update(self, stream_id: str, text: str, end: object | None) -> None:
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:  # cancelled or abandoned meanwhile
                return
            stream.pending += text
            if stream.end is None:
                stream.end = end
            call = self._take(stream_id, stream) if stream.waiter is not None else None
        if call is not None:
            call()

    def _take(self, stream_id: str, stream: _Stream) -> Callable[[], None]:
        # Under the lock: hand the pending text to the waiting poll; forget a stream once its end is read.
        waiter, text, end = stream.waiter, stream.pending, stream.end
        assert waiter is not None
        stream.waiter, stream.pending = None, ""
        stream.touched = time.monotonic()
        if end is not None:
            del self._streams[stream_id]
        return lambda: waiter(text, end)

    def poll(self, stream_id: str, reply: Reply) -> None:
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:
                raise UnknownStreamError(f"_poll_id: no stream {stream_id!r}")
            if stream.waiter is not None:
                raise InvalidRequestError(f"_poll_id: stream {stream_id!r} is already being polled")
            stream.waiter, stream.waiter_since = reply, time.monotonic()
            call = self._take(stream_id, stream) if stream.pending or stream.end is not None else None
        if call is not None:
            call()

    def discard(self, stream_id: str, error: Exception) -> bool:
        """Ends a stream now (its client cancelled); a waiting poll gets `error`. False if unknown."""
        with self._lock:
            stream = self._streams.pop(stream_id, None)
            waiter = stream.waiter if stream is not None else None
        if waiter is not None:
            waiter("", error)
        return stream is not None

    def expire_polls(self) -> None:
        """Answers polls that waited `poll_timeout_s` with no text, so front ends can check cancellation."""
        now = time.monotonic()
        calls = []
        with self._lock:
            for stream_id, stream in list(self._streams.items()):
                if stream.waiter is not None and now - stream.waiter_since >= self.poll_timeout_s:
                    calls.append(self._take(stream_id, stream))
        for call in calls:
            call()
