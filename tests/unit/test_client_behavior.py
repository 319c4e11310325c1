"""Client logic against fake tritonclient objects: retries, error chaining, batching, deadlines."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import blip2_client._async as async_mod
import blip2_client._sync as sync_mod
import numpy as np
import pytest
from blip2_client import (
    AsyncBlip2Client,
    Blip2Client,
    Blip2Error,
    DeadlineExceededError,
    InvalidInputError,
    ServerUnavailableError,
    StreamingUnsupportedError,
)
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

_real_sleep = asyncio.sleep
UNAVAILABLE = InferenceServerException(msg="connection refused", status="StatusCode.UNAVAILABLE")
INVALID = InferenceServerException(msg="image: cannot decode image bytes", status="StatusCode.INVALID_ARGUMENT")
NOT_FOUND = InferenceServerException(
    msg="Request for unknown model: 'blip2_stream' is not found", status="StatusCode.NOT_FOUND"
)


class _Result:
    def __init__(self, text: str) -> None:
        self._text = text

    def as_numpy(self, name: str) -> Any:
        return np.array([[self._text.encode()]], dtype=np.object_)


def _request_text(inputs: list[Any]) -> str:
    """Echo what the fake server received: image bytes, then prompt if any, then control names."""
    by_name = {i.name(): i for i in inputs}
    image = deserialize_bytes_tensor(by_name["image"]._get_content())[0].decode()
    parts = [image]
    if "text_input" in by_name:
        parts.append(deserialize_bytes_tensor(by_name["text_input"]._get_content())[0].decode())
    parts += sorted(n for n in by_name if n not in ("image", "text_input"))
    return "|".join(parts)


class FakeClient:
    """Stands in for tritonclient.grpc.InferenceServerClient (and its aio twin when is_async)."""

    def __init__(self, handler: Callable[[list[Any]], str], *, is_async: bool = False) -> None:
        self.handler = handler
        self.is_async = is_async
        self.calls: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self.live = True
        self.ready = True
        self.metadata: dict[str, Any] = {"blip2": {"name": "blip2", "versions": ["1"], "platform": "ensemble"}}
        self.closed = False
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def _run(self, fn: Callable[[], Any], kw: dict[str, Any]) -> Any:
        self.calls.append(kw)
        if self.errors:
            raise self.errors.pop(0)
        return fn()

    def _infer(self, model_name: str, inputs: list[Any], outputs: Any = None, **kw: Any) -> Any:
        return self._run(lambda: _Result(self.handler(inputs)), kw)

    def infer(self, model_name: str, inputs: list[Any], outputs: Any = None, **kw: Any) -> Any:
        if self.is_async:
            return self._ainfer(model_name, inputs, outputs, **kw)
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return self._infer(model_name, inputs, outputs, **kw)
        finally:
            with self._lock:
                self.active -= 1

    async def _ainfer(self, model_name: str, inputs: list[Any], outputs: Any = None, **kw: Any) -> Any:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await _real_sleep(0.01)
            return self._infer(model_name, inputs, outputs, **kw)
        finally:
            self.active -= 1

    def _maybe_async(self, value: Callable[[], Any], kw: dict[str, Any]) -> Any:
        if self.is_async:

            async def coro() -> Any:
                return self._run(value, kw)

            return coro()
        return self._run(value, kw)

    def is_server_live(self, **kw: Any) -> Any:
        return self._maybe_async(lambda: self.live, kw)

    def is_model_ready(self, model_name: str, **kw: Any) -> Any:
        return self._maybe_async(lambda: self.ready, kw)

    def get_model_metadata(self, model_name: str, as_json: bool = False, **kw: Any) -> Any:
        def lookup() -> Any:
            if model_name not in self.metadata:
                raise NOT_FOUND
            return self.metadata[model_name]

        return self._maybe_async(lookup, kw)

    def close(self) -> Any:
        self.closed = True
        if self.is_async:

            async def done() -> None:
                return None

            return done()
        return None


def _echo(inputs: list[Any]) -> str:
    return _request_text(inputs)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient(_echo)
    monkeypatch.setattr(Blip2Client, "_new_client", lambda self: client)
    return client


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[FakeClient]:
    """Every connection the client opens, each a FakeClient of its own."""
    made: list[FakeClient] = []

    def new_client(self: Blip2Client) -> FakeClient:
        made.append(FakeClient(_echo))
        return made[-1]

    monkeypatch.setattr(Blip2Client, "_new_client", new_client)
    return made


def _stream_with(monkeypatch: pytest.MonkeyPatch, stream_client: type) -> None:
    """Streams go through `stream_client` in place of tritonclient's gRPC client (the rest stays real)."""
    real_tc = sync_mod._tc

    class Grpc:
        def __getattr__(self, name: str) -> Any:
            return stream_client if name == "InferenceServerClient" else getattr(real_tc("grpc"), name)

    monkeypatch.setattr(sync_mod, "_tc", lambda protocol: Grpc())


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorded: list[float] = []
    monkeypatch.setattr(sync_mod.time, "sleep", recorded.append)
    return recorded


def test_caption_ask_generate_send_the_right_tensors(fake: FakeClient) -> None:
    with Blip2Client("localhost:8001", timeout_s=7.5) as client:
        assert client.caption(b"img") == "img"
        assert client.ask(b"img", "what?", max_tokens=3) == "img|Question: what? Answer:|max_tokens"
        assert client.generate(b"img", "a photo of", seed=1, top_p=0.5) == "img|a photo of|seed|top_p"
        assert client.generate(b"img") == "img"
    # Every call carries the finite deadline.
    assert [c["client_timeout"] for c in fake.calls] == [7.5] * 4
    assert fake.closed


def test_bad_controls_fail_before_any_request(fake: FakeClient) -> None:
    client = Blip2Client("localhost:8001")
    with pytest.raises(TypeError, match="unknown generation control"):
        client.caption(b"img", max_new_tokens=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="max_tokens"):
        client.caption_batch([b"a", b"b"], max_tokens="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="image must be"):
        client.caption_batch([b"a", 42])  # type: ignore[list-item]
    assert fake.calls == []


def test_server_errors_are_mapped_and_chained(fake: FakeClient) -> None:
    fake.errors = [INVALID]
    with pytest.raises(InvalidInputError) as info:
        Blip2Client("localhost:8001").caption(b"not an image")
    assert info.value.message == "image: cannot decode image bytes"
    assert info.value.__cause__ is INVALID


def test_no_retries_by_default(fake: FakeClient, sleeps: list[float]) -> None:
    fake.errors = [UNAVAILABLE]
    with pytest.raises(ServerUnavailableError) as info:
        Blip2Client("localhost:8001").caption(b"img")
    assert info.value.__cause__ is UNAVAILABLE
    assert len(fake.calls) == 1
    assert sleeps == []


def test_unavailable_is_retried_with_exponential_backoff(fake: FakeClient, sleeps: list[float]) -> None:
    fake.errors = [UNAVAILABLE, UNAVAILABLE]
    client = Blip2Client("localhost:8001", retries=3, retry_backoff_s=0.25)
    assert client.caption(b"img") == "img"
    assert len(fake.calls) == 3
    assert sleeps == [0.25, 0.5]


def test_retries_are_bounded(fake: FakeClient, sleeps: list[float]) -> None:
    fake.errors = [UNAVAILABLE] * 10
    with pytest.raises(ServerUnavailableError):
        Blip2Client("localhost:8001", retries=2, retry_backoff_s=0.1).caption(b"img")
    assert len(fake.calls) == 3
    assert sleeps == [0.1, 0.2]


@pytest.mark.parametrize(
    "error",
    [INVALID, InferenceServerException(msg="Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")],
)
def test_other_errors_are_never_retried(fake: FakeClient, sleeps: list[float], error: Exception) -> None:
    fake.errors = [error]
    with pytest.raises(Blip2Error):
        Blip2Client("localhost:8001", retries=5).caption(b"img")
    assert len(fake.calls) == 1


def test_deadline_message_names_the_timeout(fake: FakeClient) -> None:
    fake.errors = [InferenceServerException(msg="Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")]
    with pytest.raises(DeadlineExceededError, match=r"timeout_s=0\.5"):
        Blip2Client("localhost:8001", timeout_s=0.5).caption(b"img")


def test_http_deadline_is_total_not_per_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import gevent

    # A server that trickles bytes would reset a per-read timeout forever.
    def slow(inputs: list[Any]) -> str:
        for _ in range(20):
            gevent.sleep(0.02)
        return "late"

    fake = FakeClient(slow)
    monkeypatch.setattr(Blip2Client, "_new_client", lambda self: fake)
    client = Blip2Client("http://localhost:8000", timeout_s=0.1)
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        client.caption(b"img")
    assert time.monotonic() - start < 0.3
    # The possibly half-read connection is discarded.
    assert fake.closed


def test_batch_keeps_order_and_bounds_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    def jittery(inputs: list[Any]) -> str:
        text = _request_text(inputs)
        time.sleep(0.001 * (hash(text) % 7))
        return text

    fake = FakeClient(jittery)
    monkeypatch.setattr(Blip2Client, "_new_client", lambda self: fake)
    images = [f"img{i}".encode() for i in range(40)]
    with Blip2Client("localhost:8001", max_concurrency=4) as client:
        assert client.caption_batch(images) == [f"img{i}" for i in range(40)]
        assert client.ask_batch(images[:3], "q?") == [f"img{i}|Question: q? Answer:" for i in range(3)]
        assert client.ask_batch(images[:2], ["a", "b"]) == ["img0|Question: a Answer:", "img1|Question: b Answer:"]
        assert client.generate_batch(images[:2], ["p", None], max_tokens=2) == ["img0|p|max_tokens", "img1|max_tokens"]
        assert client.caption_batch([]) == []
    assert 1 < fake.max_active <= 4


def test_batch_raises_the_first_error_in_input_order(fake: FakeClient) -> None:
    def handler(inputs: list[Any]) -> str:
        text = _request_text(inputs)
        if text == "bad":
            raise INVALID
        return text

    fake.handler = handler
    with Blip2Client("localhost:8001") as client, pytest.raises(InvalidInputError):
        client.caption_batch([b"a", b"bad", b"c"])


def test_batch_length_mismatch(fake: FakeClient) -> None:
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        Blip2Client("localhost:8001").ask_batch([b"a", b"b"], ["q"])


def test_each_thread_gets_its_own_transport(connections: list[FakeClient]) -> None:
    created = connections
    client = Blip2Client("localhost:8001")
    client.caption(b"a")
    client.caption(b"b")
    thread = threading.Thread(target=client.caption, args=(b"c",))
    thread.start()
    thread.join()
    assert len(created) == 2
    client.close()
    assert all(c.closed for c in created)
    with pytest.raises(RuntimeError, match="closed"):
        client.caption(b"d")


def test_health(fake: FakeClient) -> None:
    client = Blip2Client("localhost:8001")
    assert client.is_live() and client.is_ready()
    fake.ready = False
    assert not client.is_ready()
    fake.errors = [UNAVAILABLE, UNAVAILABLE]
    assert not client.is_live()
    assert not client.is_ready()
    assert client.model_metadata().platform == "ensemble"


def test_wait_until_ready(fake: FakeClient, sleeps: list[float]) -> None:
    fake.errors = [UNAVAILABLE, UNAVAILABLE]
    client = Blip2Client("localhost:8001")
    client.wait_until_ready(5.0, poll_interval_s=0.01)
    assert len(fake.calls) == 3


def test_wait_until_ready_times_out(fake: FakeClient) -> None:
    fake.ready = False
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="not ready within"):
        Blip2Client("localhost:8001").wait_until_ready(0.2, poll_interval_s=0.05)
    assert time.monotonic() - start < 1.0


def test_connections_of_finished_threads_are_released(connections: list[FakeClient]) -> None:
    made = connections
    client = Blip2Client("localhost:8001")
    assert client.caption(b"main") == "main"  # this thread keeps its connection
    for i in range(5):  # e.g. a ThreadingHTTPServer: a new thread per request
        thread = threading.Thread(target=client.caption, args=(f"t{i}".encode(),))
        thread.start()
        thread.join()
        del thread
        gc.collect()
    assert len(made) == 6
    # Each ended thread's connection is closed when the next thread connects; the last one waits for that or
    # for close().
    assert [c.closed for c in made] == [False, True, True, True, True, False]
    assert client._clients == [made[0], made[5]]
    client.close()
    assert all(c.closed for c in made)


def test_a_stream_deadline_counts_from_its_start(fake: FakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.metadata["blip2_stream"] = {"name": "blip2_stream"}

    class Final:
        def as_numpy(self, name: str) -> Any:
            return np.array([[b"done"]], dtype=np.object_)

        def get_response(self) -> Any:
            flag = type("Flag", (), {"bool_param": True})()
            return type("Response", (), {"parameters": {"triton_final_response": flag}})()

    class StreamClient:
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

        def start_stream(self, callback: Callable[..., None], **kwargs: Any) -> None:
            self.callback = callback

        def async_stream_infer(self, *args: Any, **kwargs: Any) -> None:
            threading.Timer(0.05, self.callback, args=(Final(), None)).start()

        def stop_stream(self, cancel_requests: bool = False) -> None: ...

        def close(self) -> None: ...

    _stream_with(monkeypatch, StreamClient)
    pieces = Blip2Client("localhost:8001", timeout_s=0.3).stream(b"img")
    time.sleep(0.4)  # longer than timeout_s between the call and the first next()
    assert list(pieces) == ["done"]


def test_stream_without_streaming_model(fake: FakeClient) -> None:
    with pytest.raises(StreamingUnsupportedError, match="blip2_stream") as info:
        Blip2Client("localhost:8001").stream(b"img")
    assert isinstance(info.value.__cause__, ServerUnavailableError)


def test_a_draining_server_makes_streams_unavailable_not_unsupported(fake: FakeClient, monkeypatch) -> None:
    draining = InferenceServerException(
        msg="Request for unknown model: 'blip2_stream' has no available versions", status="StatusCode.NOT_FOUND")

    def lookup(model_name: str, as_json: bool = False, **kw: Any) -> Any:
        raise draining

    monkeypatch.setattr(fake, "get_model_metadata", lookup)
    with pytest.raises(ServerUnavailableError) as info:
        next(iter(Blip2Client("localhost:8001").stream(b"img")))
    assert not isinstance(info.value, StreamingUnsupportedError)


def test_stream_over_http_is_unsupported(fake: FakeClient) -> None:
    fake.metadata["blip2_stream"] = {"name": "blip2_stream"}
    with pytest.raises(StreamingUnsupportedError, match="grpc"):
        Blip2Client("http://localhost:8000").stream(b"img")


def test_stream_over_http_is_refused_before_any_network_call(fake: FakeClient) -> None:
    fake.errors = [UNAVAILABLE]  # a server that cannot be reached must not hide the protocol error
    with pytest.raises(StreamingUnsupportedError, match="grpc"):
        Blip2Client("http://localhost:8000").stream(b"img")
    assert fake.calls == []


def test_backoff_stops_growing(sleeps: list[float], fake: FakeClient) -> None:
    fake.errors = [UNAVAILABLE] * 12
    with pytest.raises(ServerUnavailableError):
        Blip2Client("localhost:8001", retries=10, retry_backoff_s=1.0).caption(b"img")
    assert sleeps[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert max(sleeps) == 30.0


@pytest.mark.parametrize(("timeout_s", "poll_interval_s"), [(float("nan"), 0.5), (-1.0, 0.5), (1.0, 0.0),
                                                             (1.0, float("inf"))])
def test_wait_until_ready_rejects_unbounded_settings(fake: FakeClient, timeout_s: float,
                                                     poll_interval_s: float) -> None:
    def refused(wait: Callable[[], Any]) -> bool:
        # In a thread with a deadline: accepted, a NaN timeout polls forever.
        errors: list[ValueError] = []

        def run() -> None:
            try:
                wait()
            except ValueError as e:
                errors.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(5)
        return bool(errors) and any(n in str(errors[0]) for n in ("timeout_s", "poll_interval_s"))

    assert refused(lambda: Blip2Client("localhost:8001").wait_until_ready(timeout_s, poll_interval_s=poll_interval_s))
    assert refused(lambda: asyncio.run(
        _async_client(fake).wait_until_ready(timeout_s, poll_interval_s=poll_interval_s)))


def test_a_stream_starts_only_when_iterated(fake: FakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.metadata["blip2_stream"] = {"name": "blip2_stream"}
    started: list[str] = []

    class StreamClient:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            started.append("client")

        def start_stream(self, callback: Callable[..., None], **kwargs: Any) -> None:
            started.append("stream")
            callback(None, UNAVAILABLE)

        def async_stream_infer(self, *args: Any, **kwargs: Any) -> None: ...

        def stop_stream(self, cancel_requests: bool = False) -> None:
            started.append(f"stop cancel={cancel_requests}")

        def close(self) -> None:
            started.append("close")

    _stream_with(monkeypatch, StreamClient)
    client = Blip2Client("localhost:8001")
    pieces = client.stream(b"img")
    del pieces  # dropped unread: nothing may have started
    assert started == []
    with pytest.raises(ServerUnavailableError):
        list(client.stream(b"img"))
    assert started == ["client", "stream", "stop cancel=True", "close"]


# -- asyncio -------------------------------------------------------------------------


def _async_client(fake: FakeClient, url: str = "localhost:8001", **options: Any) -> AsyncBlip2Client:
    client = AsyncBlip2Client(url, **options)
    client._aclient = fake
    return client


def test_async_calls_and_batch() -> None:
    fake = FakeClient(_echo, is_async=True)

    async def run() -> None:
        async with _async_client(fake, max_concurrency=3, timeout_s=4.0) as client:
            assert await client.caption(b"img") == "img"
            assert await client.ask(b"img", "q", top_k=2) == "img|Question: q Answer:|top_k"
            images = [f"img{i}".encode() for i in range(20)]
            assert await client.caption_batch(images) == [f"img{i}" for i in range(20)]
            assert await client.ask_batch(images[:2], ["a", "b"]) == [
                "img0|Question: a Answer:",
                "img1|Question: b Answer:",
            ]
            assert await client.generate_batch([], "p") == []
            assert await client.is_live() and await client.is_ready()
            assert (await client.model_metadata()).name == "blip2"

    asyncio.run(run())
    assert 1 < fake.max_active <= 3
    assert {c["client_timeout"] for c in fake.calls} == {4.0}
    assert fake.closed


def test_async_errors_retries_and_cancellation(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeClient(_echo, is_async=True)
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)

    async def run() -> None:
        client = _async_client(fake, retries=2, retry_backoff_s=0.5)
        fake.errors = [UNAVAILABLE, UNAVAILABLE]
        monkeypatch.setattr(async_mod.asyncio, "sleep", fake_sleep)
        assert await client.caption(b"img") == "img"
        monkeypatch.undo()
        assert delays == [0.5, 1.0]

        fake.errors = [INVALID]
        with pytest.raises(InvalidInputError) as info:
            await client.caption(b"img")
        assert info.value.__cause__ is INVALID

        def handler(inputs: list[Any]) -> str:
            if _request_text(inputs) == "bad":
                raise INVALID
            return "ok"

        fake.handler = handler
        with pytest.raises(InvalidInputError):
            await client.caption_batch([b"a", b"bad", b"c", b"d"])
        # The batch's other tasks were cancelled or finished, none left running.
        assert fake.active == 0
        with pytest.raises(StreamingUnsupportedError):
            async for _ in client.stream(b"img"):
                pass
        await client.close()
        with pytest.raises(RuntimeError, match="closed"):
            await client.caption(b"img")

    asyncio.run(run())


def test_async_deadline_holds_even_if_the_transport_hangs() -> None:
    async def hang(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(10)

    fake = FakeClient(_echo, is_async=True)
    fake.infer = hang  # type: ignore[method-assign]

    async def run() -> float:
        client = _async_client(fake, timeout_s=0.05)
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError, match=r"timeout_s=0\.05"):
            await client.caption(b"img")
        return time.monotonic() - start

    assert asyncio.run(run()) < 1.0
