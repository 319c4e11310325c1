"""Request limits the front applies before Triton sees a byte: JSON nesting depth, in-flight bytes, request ids.

Triton 2.51's HTTP frontend parses JSON recursively: a 1.4 MB body nested 100,000 levels deep overflows its stack
and the whole server dies (SIGSEGV). The scan here never recurses and costs O(body) vectorised work whatever the
nesting, so a body is measured before anything parses it.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import deque

import numpy as np

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_STRUCTURAL = tuple(map(ord, '[]{}"\\'))
# +1 opens, -1 closes, 2 a quote, 3 a backslash.
_KIND = np.zeros(256, dtype=np.int8)
_KIND[[ord("["), ord("{")]] = 1
_KIND[[ord("]"), ord("}")]] = -1
_KIND[_QUOTE] = 2
_KIND[_BACKSLASH] = 3
_CHUNK = 1 << 22
# Brackets, quotes and backslashes a body may hold: a request here has a handful (its images travel as binary
# tensors or base64 strings), and the bound keeps the scan at tens of milliseconds for any body.
MAX_JSON_STRUCTURE = 1 << 20


class JsonLimitError(ValueError):
    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large  # over the structure bound (HTTP 413) rather than too deep (400)


def check_json(data: bytes | bytearray | memoryview, max_depth: int) -> None:
    """Raises JsonLimitError for a body nested deeper than `max_depth` or with more than MAX_JSON_STRUCTURE
    brackets, quotes and backslashes; never parses or recurses."""
    buf = np.frombuffer(data, dtype=np.uint8)
    where = _structural_positions(buf)
    kind = _KIND[buf[where]]
    if int(np.count_nonzero(kind == 1)) <= max_depth:
        return  # the usual case: fewer brackets in total than the limit
    depth = json_depth(kind, where)
    if depth > max_depth:
        raise JsonLimitError(f"JSON body: expected nesting at most {max_depth} deep, got {depth}")


def _structural_positions(buf: np.ndarray) -> np.ndarray:
    parts = []
    count = 0
    for start in range(0, len(buf), _CHUNK):  # bounded temporaries for large bodies
        chunk = buf[start:start + _CHUNK]
        mask = chunk == _STRUCTURAL[0]
        for byte in _STRUCTURAL[1:]:
            mask |= chunk == byte
        count += int(np.count_nonzero(mask))
        if count > MAX_JSON_STRUCTURE:
            raise JsonLimitError(f"JSON body: expected at most {MAX_JSON_STRUCTURE} brackets, quotes and "
                                 f"backslashes, got more", too_large=True)
        parts.append(np.flatnonzero(mask) + start)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.intp)


def json_depth(kind: np.ndarray, where: np.ndarray) -> int:
    """Deepest nesting of a body, given its structural bytes (`kind` per _KIND) and their positions.

    Follows JSON's string grammar: a quote opens or closes a string unless an odd run of backslashes directly
    precedes it, and brackets inside strings do not count. On any valid JSON prefix that is the parser's view;
    after the first byte that is not valid JSON the parser stops, so what is counted there cannot matter."""
    if len(kind) == 0:
        return 0
    # link[i]: structural byte i is a backslash directly followed, in the body, by structural byte i + 1.
    link = np.zeros(len(kind), dtype=bool)
    link[:-1] = (kind[:-1] == 3) & (where[1:] == where[:-1] + 1)
    quote_at = np.flatnonzero(kind == 2)
    if link.any() and len(quote_at):
        index = np.arange(len(kind))
        last_break = np.maximum.accumulate(np.where(link, -1, index))
        before = quote_at - 1
        runs = np.where(before >= 0, before - last_break[np.maximum(before, 0)], 0)
        quote_at = quote_at[runs % 2 == 0]
    delta = np.where(kind < 2, kind, 0).astype(np.int32)
    if len(quote_at):
        # Bytes between a live opening quote and its closing quote are inside a string.
        toggles = np.zeros(len(kind), dtype=np.uint8)
        toggles[quote_at[quote_at + 1 < len(kind)] + 1] = 1
        delta[np.bitwise_xor.accumulate(toggles).view(bool)] = 0
    return max(int(np.cumsum(delta).max()), 0)


class BudgetExhaustedError(Exception):
    pass


class ByteBudget:
    """Bytes of requests in flight towards Triton, capped: a request waits (first come, first served, up to
    `wait_s`) for room. Every request's tensors land in the Python backend's shared memory, which grows to the
    peak and never shrinks; capping what is in flight at once caps that peak. For one event loop; `release` is
    synchronous so that cleanup code that cannot await (a cancelled task) can still give bytes back."""

    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, nbytes: int) -> int:
        """Takes room for `nbytes` (at most the whole capacity) and returns what was taken."""
        nbytes = min(nbytes, self.capacity)
        if not self._waiters and self.in_use + nbytes <= self.capacity:
            self.in_use += nbytes
            return nbytes
        entry = (nbytes, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(entry[1]), self.wait_s)
        except BaseException as e:
            if entry[1].done():
                self.release(nbytes)  # granted just as the wait ended
            else:
                entry[1].cancel()
                self._waiters.remove(entry)
                self._grant()
            if isinstance(e, asyncio.TimeoutError):
                raise BudgetExhaustedError(
                    f"front: {self.in_use} request bytes already in flight towards Triton (limit {self.capacity}); "
                    "retry later") from e
            raise
        return nbytes

    def release(self, nbytes: int) -> None:
        self.in_use -= nbytes
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity:
            nbytes, future = self._waiters.popleft()
            self.in_use += nbytes
            future.set_result(None)


# What an incoming x-request-id may be: it is echoed in headers and logs, so no control characters or spaces.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def request_id(incoming: str | None) -> str:
    """The client's id when it is a sane token, else a fresh one."""
    if incoming and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex
