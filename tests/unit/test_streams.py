"""The LLM stage's long-poll stream buffers (`blip2_triton.streams`), without Triton."""

from __future__ import annotations

import threading
import time

import pytest

from blip2_triton.errors import InvalidRequestError
from blip2_triton.serving.streams import StreamHub, UnknownStreamError


class Replies:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, Exception | None]] = []

    def __call__(self, text: str, end: object | None) -> None:
        self.calls.append((text, end is not None, end if isinstance(end, Exception) else None))


def test_pieces_written_before_a_poll_are_delivered_together() -> None:
    hub, replies = StreamHub(), Replies()
    hub.open("a")
    hub.piece("a", "a red")
    hub.piece("a", " car")
    hub.poll("a", replies)
    assert replies.calls == [("a red car", False, None)]
    hub.finish("a", "a red car")
    hub.poll("a", replies)
    assert replies.calls[-1] == ("", True, None)
    assert len(hub) == 0, "a stream whose end was read is forgotten"


def test_a_waiting_poll_is_answered_by_the_next_piece() -> None:
    hub, replies = StreamHub(), Replies()
    hub.open("a")
    hub.poll("a", replies)
    assert replies.calls == []
    hub.piece("a", "two")
    assert replies.calls == [("two", False, None)]
    hub.piece("a", " dogs")  # nobody polls: kept for the next poll
    assert len(replies.calls) == 1
    hub.poll("a", replies)
    assert replies.calls[-1] == (" dogs", False, None)


def test_the_error_that_ends_a_stream_reaches_its_poll() -> None:
    hub, replies = StreamHub(), Replies()
    hub.open("a")
    hub.poll("a", replies)
    error = InvalidRequestError("max_tokens: expected <= 256, got 999")
    hub.finish("a", error)
    assert replies.calls == [("", True, error)]
    with pytest.raises(UnknownStreamError, match="no stream 'a'"):
        hub.poll("a", replies)


def test_polls_time_out_empty_so_the_front_end_can_check_cancellation() -> None:
    hub, replies = StreamHub(poll_timeout_s=0.05), Replies()
    hub.open("a")
    hub.poll("a", replies)
    hub.expire_polls()
    assert replies.calls == [], "not yet due"
    time.sleep(0.06)
    hub.expire_polls()
    assert replies.calls == [("", False, None)]
    assert len(hub) == 1, "the stream itself lives on"


def test_discard_answers_the_waiting_poll_and_drops_later_text() -> None:
    hub, replies = StreamHub(), Replies()
    hub.open("a")
    hub.poll("a", replies)
    cancelled = RuntimeError("request cancelled")
    assert hub.discard("a", cancelled)
    assert replies.calls == [("", True, cancelled)]
    hub.piece("a", "late")  # the engine may still finish the step it was in
    hub.finish("a", "late")
    assert len(replies.calls) == 1 and len(hub) == 0
    assert not hub.discard("a", cancelled)


def test_misuse_is_a_request_error() -> None:
    hub, replies = StreamHub(), Replies()
    hub.open("a")
    with pytest.raises(InvalidRequestError, match="already exists"):
        hub.open("a")
    hub.poll("a", replies)
    with pytest.raises(InvalidRequestError, match="already being polled"):
        hub.poll("a", replies)


def test_abandoned_streams_are_dropped_when_new_ones_open() -> None:
    hub = StreamHub(abandon_after_s=0.0)
    hub.open("old")
    time.sleep(0.01)
    hub.open("new")
    assert len(hub) == 1


def test_concurrent_writer_and_poller_see_every_character_once() -> None:
    hub = StreamHub(poll_timeout_s=0.001)
    hub.open("a")
    words = [f"w{i} " for i in range(2000)]

    def write() -> None:
        for word in words:
            hub.piece("a", word)
        hub.finish("a", "".join(words))

    got: list[str] = []
    done = threading.Event()

    def reply(text: str, end: object | None) -> None:
        got.append(text)
        if end is not None:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    while not done.is_set():
        arrived = threading.Event()
        hub.poll("a", lambda t, end, arrived=arrived: (reply(t, end), arrived.set()))
        while not arrived.wait(0.001):
            hub.expire_polls()
    writer.join()
    assert "".join(got) == "".join(words)
