from __future__ import annotations

import collections
import contextlib
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ._base import Op, _ClientConfig
from ._errors import Blip2Error, DeadlineExceededError, ServerUnavailableError
from ._images import ImageInput, encode_image
from ._request import (
    Generation,
    ModelMetadata,
    batch_prompts,
    build_inputs,
    control_tensors,
    decode_generation,
    decode_text,
    requested_outputs,
    vqa_prompt,
)
from ._retrieval import OUTPUTS, batch_jobs, check_text, output_array, retrieval_inputs, stacked

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    if sys.version_info >= (3, 11):
        from typing import Self, Unpack
    else:
        from typing_extensions import Self, Unpack

    from ._request import Controls

T = TypeVar("T")


def _tc(protocol: str) -> ModuleType:
    # Imported on first use so gRPC users never load gevent and vice versa.
    if protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    module: ModuleType = tc
    return module


def _release_client(owner_ref: weakref.ref[Blip2Client], client: Any) -> None:
    # Runs wherever the garbage collector runs, possibly inside a `with owner._lock:` on this very thread, so it
    # takes no lock: the next thread to connect (or close()) closes the connection.
    owner = owner_ref()
    if owner is not None:
        owner._released.append(client)


class Blip2Client(_ClientConfig):
    """Blocking client for the `blip2` ensemble.

    Safe to share between threads: each thread gets its own underlying
    tritonclient connection (tritonclient's clients are not thread-safe).
    Batch methods run on an internal pool of `max_concurrency` threads.
    """

    def _init_state(self) -> None:
        self._local = threading.local()
        self._clients: list[Any] = []
        # Connections of threads that have ended (see `_release_client`); deque operations need no lock.
        self._released: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connections and the batch thread pool; idempotent. The client cannot be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()

    # -- transport -----------------------------------------------------------------

    def _new_client(self) -> Any:
        tc = _tc(self._protocol)
        if self._protocol == "grpc":
            return tc.InferenceServerClient(self._hostport, ssl=self._ssl)
        return tc.InferenceServerClient(
            self._hostport,
            ssl=self._ssl,
            connection_timeout=self.timeout_s,
            network_timeout=self.timeout_s,
        )

    def _client(self) -> Any:
        if self._closed:
            raise RuntimeError("Blip2Client is closed")
        client = getattr(self._local, "client", None)
        if client is None:
            ended: list[Any] = []
            with self._lock:
                if self._closed:
                    raise RuntimeError("Blip2Client is closed")
                while self._released:
                    old = self._released.popleft()
                    if old in self._clients:
                        self._clients.remove(old)
                        ended.append(old)
                client = self._new_client()
                self._clients.append(client)
            for old in ended:
                with contextlib.suppress(Exception):
                    old.close()
            self._local.client = client
            # A server that runs each request on a new thread would otherwise leave one open connection per
            # thread it ever ran, until close(): the connection goes when its thread does.
            self._local.release = weakref.finalize(
                threading.current_thread(), _release_client, weakref.ref(self), client
            )
        return client

    def _drop_client(self) -> None:
        # After a timeout or a dropped connection an HTTP connection may hold half a
        # response; a fresh one is cheaper than reasoning about its state.
        client = getattr(self._local, "client", None)
        if client is None:
            return
        self._local.client = None
        self._local.release.detach()
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        with contextlib.suppress(Exception):
            client.close()

    def _once(self, op: Op, timeout_s: float) -> Any:
        client = self._client()
        try:
            if self._protocol == "grpc":
                return op(client, {"client_timeout": timeout_s})
            import gevent

            # geventhttpclient's network_timeout bounds each socket read, not the
            # whole call; gevent.Timeout makes the deadline total.
            with gevent.Timeout(timeout_s, TimeoutError(f"no response within timeout_s={timeout_s:g}")):
                return op(client, {})
        except Blip2Error:
            raise
        except Exception as e:
            err = self._mapped(e, timeout_s)
            if self._protocol == "http" and isinstance(err, (DeadlineExceededError, ServerUnavailableError)):
                self._drop_client()
            raise err from e

    def _call(self, op: Op, *, timeout_s: float | None = None, retry: bool = True) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        attempt = 0
        while True:
            try:
                return self._once(op, timeout_s)
            except ServerUnavailableError:
                if not retry or attempt >= self.retries:
                    raise
                time.sleep(self._backoff_s(attempt))
                attempt += 1

    def _infer(self, image: bytes, prompt: str | None, controls: dict[str, Any]) -> str:
        tc = _tc(self._protocol)
        inputs = build_inputs(tc, image, prompt, controls)
        outputs = requested_outputs(tc)
        text: str = self._call(lambda c, kw: decode_text(c.infer(self.model_name, inputs, outputs=outputs, **kw)))
        return text

    def _infer_detailed(self, image: bytes, prompt: str | None, controls: dict[str, Any]) -> Generation:
        inputs = build_inputs(_tc(self._protocol), image, prompt, controls)
        # No outputs named: the server sends every output it has (older servers: the text alone).
        result: Generation = self._call(lambda c, kw: decode_generation(c.infer(self.model_name, inputs, **kw)))
        return result

    def _map(self, jobs: list[Callable[[], T]]) -> list[T]:
        if len(jobs) <= 1:
            return [job() for job in jobs]
        with self._lock:
            if self._closed:
                raise RuntimeError("Blip2Client is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="blip2-client")
            pool = self._pool
        futures: list[Future[T]] = [pool.submit(job) for job in jobs]
        try:
            return [f.result() for f in futures]
        finally:
            # On the first failure the requests not yet sent are dropped; those in
            # flight finish in the background and their results are discarded.
            for f in futures:
                f.cancel()

    # -- generation ----------------------------------------------------------------

    def generate(self, image: ImageInput, prompt: str | None = None, **controls: Unpack[Controls]) -> str:
        """Generate text for one image (`model_name`, `blip2` by default).

        Args:
            image: a path, bytes, binary file, PIL image or uint8 array (see *Images* in docs/CLIENT.md).
            prompt: the text prompt as the model expects it (e.g. `Question: ... Answer:`); None or empty asks for
                a caption.
            **controls: `max_tokens`, `temperature`, `top_p`, `top_k`, `beam_width`, `repetition_penalty`, `seed`
                (docs/CONTRACT.md); each left out keeps the server's default (greedy, 30 tokens).

        Returns:
            The generated continuation (the prompt not echoed), stripped.

        Raises:
            InvalidInputError: the server refused the request; the message names the input at fault.
            ServerUnavailableError: the server or a stage cannot serve now (after `retries` retries).
            DeadlineExceededError: no answer within `timeout_s`.
            Blip2Error: any other failed call.
            TypeError / ValueError: an image or control the client cannot send (before any I/O).
        """
        control_tensors(controls)  # fail on a bad control before any I/O
        return self._infer(encode_image(image), prompt, dict(controls))

    def generate_result(self, image: ImageInput, prompt: str | None = None,
                        **controls: Unpack[Controls]) -> Generation:
        """`generate`, with what the server reports about the generation.

        Returns:
            A `Generation`: `text`, `finish_reason` ("stop" when the model ended the text, "length" at
            `max_tokens`), `output_tokens` and `input_tokens` (None from a server that does not report them).

        Raises:
            As `generate`.
        """
        control_tensors(controls)
        return self._infer_detailed(encode_image(image), prompt, dict(controls))

    def caption(self, image: ImageInput, **controls: Unpack[Controls]) -> str:
        """A caption of the image: `generate(image, None, **controls)`.

        Returns / Raises: as `generate`.
        """
        return self.generate(image, None, **controls)

    def ask(self, image: ImageInput, question: str, **controls: Unpack[Controls]) -> str:
        """The answer to `question` about the image: `generate` with the VQA prompt `Question: {question} Answer:`.

        Returns / Raises: as `generate`.
        """
        return self.generate(image, vqa_prompt(question), **controls)

    def generate_batch(
        self,
        images: Iterable[ImageInput],
        prompts: str | Sequence[str | None] | None = None,
        **controls: Unpack[Controls],
    ) -> list[str]:
        """`generate` for each image, one request each, up to `max_concurrency` in flight.

        Args:
            images: the images (as for `generate`); every one is encoded before anything is sent, so a bad image
                argument fails the whole batch up front.
            prompts: one prompt for all images, one per image, or None for captions.
            **controls: as for `generate`, for every request.

        Returns:
            The texts, in input order.

        Raises:
            The first failed request's error, as `generate` raises it; ValueError when `prompts` and `images`
            differ in length.
        """
        control_tensors(controls)
        encoded = [encode_image(img) for img in images]
        per_image = batch_prompts(len(encoded), prompts, "prompts")
        ctl = dict(controls)
        return self._map([partial(self._infer, b, p, ctl) for b, p in zip(encoded, per_image, strict=True)])

    def caption_batch(self, images: Iterable[ImageInput], **controls: Unpack[Controls]) -> list[str]:
        """A caption of each image (`generate_batch` with no prompts); texts in input order."""
        return self.generate_batch(images, None, **controls)

    def ask_batch(
        self, images: Iterable[ImageInput], questions: str | Sequence[str], **controls: Unpack[Controls]
    ) -> list[str]:
        """Ask one question of every image, or questions[i] of images[i] (`generate_batch` with VQA prompts).

        Returns / Raises: as `generate_batch`.
        """
        if isinstance(questions, str):
            return self.generate_batch(images, vqa_prompt(questions), **controls)
        return self.generate_batch(images, [vqa_prompt(q) for q in questions], **controls)

    def stream(self, image: ImageInput, prompt: str | None = None, **controls: Unpack[Controls]) -> Iterator[str]:
        """Yield text pieces as the server generates them (gRPC, decoupled `stream_model_name`).

        Raises StreamingUnsupportedError right away when the server has no
        streaming model or the protocol is HTTP. The whole stream shares one
        `timeout_s` deadline.
        """
        control_tensors(controls)
        data = encode_image(image)
        self._check_stream_protocol()
        try:
            self._call(self._metadata_op(self.stream_model_name), retry=False)
        except Blip2Error as e:
            if self._is_stream_model_missing(e):
                raise self._stream_missing_error() from e
            raise
        tc = _tc("grpc")
        return self._stream(tc, build_inputs(tc, data, prompt, dict(controls)))

    def _stream(self, tc: Any, inputs: list[Any]) -> Iterator[str]:
        # The stream starts at the first next(), inside the try: an iterator dropped before that started nothing
        # (a started one, never iterated, would block whoever released it until the server finished generating).
        # Its deadline counts from there too. A tritonclient gRPC client carries at most one stream, so each
        # stream gets its own.
        deadline = time.monotonic() + self.timeout_s
        client = tc.InferenceServerClient(self._hostport, ssl=self._ssl)
        pieces: queue.Queue[tuple[Any, Exception | None]] = queue.Queue()
        try:
            try:
                client.start_stream(
                    callback=lambda result, error: pieces.put((result, error)), stream_timeout=self.timeout_s
                )
                client.async_stream_infer(
                    self.stream_model_name,
                    inputs,
                    outputs=requested_outputs(tc),
                    enable_empty_final_response=True,
                )
            except Exception as e:
                raise self._mapped(e, self.timeout_s) from e
            while True:
                try:
                    result, error = pieces.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    raise DeadlineExceededError(f"stream did not finish within timeout_s={self.timeout_s:g}") from None
                if error is not None:
                    raise self._mapped(error, self.timeout_s) from error
                response = result.get_response()
                if result.as_numpy("text_output") is not None:
                    text = decode_text(result)
                    if text:
                        yield text
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
        finally:
            with contextlib.suppress(Exception):
                client.stop_stream(cancel_requests=True)
            with contextlib.suppress(Exception):
                client.close()

    # -- retrieval and matching ------------------------------------------------------

    def _retrieve(
        self, entry: str, image: bytes | None, text: str | None, timeout_s: float | None
    ) -> npt.NDArray[np.float32]:
        tc = _tc(self._protocol)
        model, (output, ndim) = self._retrieval_model(entry), OUTPUTS[entry]
        inputs, outputs = retrieval_inputs(tc, image, text), [tc.InferRequestedOutput(output)]
        result: npt.NDArray[np.float32] = self._call(
            lambda c, kw: output_array(c.infer(model, inputs, outputs=outputs, **kw), output, ndim),
            timeout_s=timeout_s,
        )
        return result

    def embed_image(self, image: ImageInput, *, timeout_s: float | None = None) -> npt.NDArray[np.float32]:
        """The image's normalised per-query embeddings (`blip2_embed_image`).

        Args:
            image: a path, bytes, binary file, PIL image or uint8 array (see *Images* in docs/CLIENT.md).
            timeout_s: this call's deadline; default the client's `timeout_s`.

        Returns:
            float32 array [num_query_tokens, embed_dim], each row of unit length (both sizes from the checkpoint).

        Raises:
            InvalidInputError: the server could not use the image. Other `Blip2Error`s as for `generate`;
            TypeError / ValueError for an image argument the client cannot encode.
        """
        return self._retrieve("embed_image", encode_image(image), None, timeout_s)

    def embed_text(self, text: str, *, timeout_s: float | None = None) -> npt.NDArray[np.float32]:
        """The text's normalised embedding (`blip2_embed_text`).

        Args:
            text: non-empty text within the server's token limit.
            timeout_s: this call's deadline; default the client's `timeout_s`.

        Returns:
            float32 array [embed_dim] of unit length.

        Raises:
            InvalidInputError: empty or whitespace-only text, text over the limit, the image token in the text.
            TypeError: `text` is not a str.
        """
        return self._retrieve("embed_text", None, check_text(text), timeout_s)

    def similarity(self, image: ImageInput, text: str, *, timeout_s: float | None = None) -> float:
        """The contrastive score of the pair (`blip2_similarity`): the largest cosine similarity between the
        image's query embeddings and the text's embedding, in [-1, 1]; higher ranks first.

        Args:
            image: as for `embed_image`.
            text: as for `embed_text`.
            timeout_s: this call's deadline; default the client's `timeout_s`.

        Returns:
            The score, equal to `similarity_scores(embed_image(image), embed_text(text))`.

        Raises:
            InvalidInputError: the server could not use the image or the text (the message names which).
        """
        return float(self._retrieve("similarity", encode_image(image), check_text(text), timeout_s)[0])

    def match(self, image: ImageInput, text: str, *, timeout_s: float | None = None) -> float:
        """The probability that the text describes the image, from the image-text matching head (`blip2_match`).

        Args:
            image: as for `embed_image`.
            text: as for `embed_text`.
            timeout_s: this call's deadline; default the client's `timeout_s`.

        Returns:
            P(match) in [0, 1].

        Raises:
            InvalidInputError: the server could not use the image or the text (the message names which).
        """
        return float(self._retrieve("match", encode_image(image), check_text(text), timeout_s)[0])

    def embed_image_batch(
        self, images: Iterable[ImageInput], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.float32]:
        """`embed_image` for each image, up to `max_concurrency` requests in flight (batched by the server).

        Returns:
            float32 array [images, num_query_tokens, embed_dim], in input order.

        Raises:
            The first failed request's error; every image is encoded before anything is sent.
        """
        return stacked(self._map(batch_jobs(self._retrieve, "embed_image", timeout_s, images=images)), 2)

    def embed_text_batch(self, texts: Iterable[str], *, timeout_s: float | None = None) -> npt.NDArray[np.float32]:
        """`embed_text` for each text, concurrently. Returns float32 [texts, embed_dim], in input order.

        Raises:
            The first failed request's error.
        """
        return stacked(self._map(batch_jobs(self._retrieve, "embed_text", timeout_s, texts=texts)), 1)

    def similarity_batch(
        self, images: Iterable[ImageInput], texts: str | Sequence[str], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.float32]:
        """`similarity` of images[i] with one text for all, or with texts[i]. Returns float32 [images].

        Raises:
            The first failed request's error; ValueError when the counts of images and texts differ.
        """
        return self._pairs("similarity", images, texts, timeout_s)

    def match_batch(
        self, images: Iterable[ImageInput], texts: str | Sequence[str], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.float32]:
        """`match` of images[i] with one text for all, or with texts[i]. Returns float32 [images].

        Raises:
            The first failed request's error; ValueError when the counts of images and texts differ.
        """
        return self._pairs("match", images, texts, timeout_s)

    def _pairs(
        self, entry: str, images: Iterable[ImageInput], texts: str | Sequence[str], timeout_s: float | None
    ) -> npt.NDArray[np.float32]:
        jobs = batch_jobs(self._retrieve, entry, timeout_s, images=images, texts=texts)
        return stacked(self._map(jobs), 1).reshape(-1)

    # -- health and metadata ---------------------------------------------------------

    def _metadata_op(self, model_name: str) -> Op:
        if self._protocol == "grpc":
            return lambda c, kw: c.get_model_metadata(model_name, as_json=True, **kw)
        return lambda c, kw: c.get_model_metadata(model_name, **kw)

    def model_metadata(self) -> ModelMetadata:
        """The served model's name, versions, inputs and outputs (`model_name`).

        Raises:
            ServerUnavailableError: the model is not served (or not ready); Blip2Error for other failures.
        """
        return ModelMetadata.from_dict(self._call(self._metadata_op(self.model_name)))

    def is_live(self) -> bool:
        """Whether the server answers at all (`/v2/health/live`).

        Returns:
            True when live; False (not an error) when it cannot be reached or does not answer in `timeout_s`.
        """
        try:
            return bool(self._call(lambda c, kw: c.is_server_live(**kw), retry=False))
        except (ServerUnavailableError, DeadlineExceededError):
            return False

    def is_ready(self, *, timeout_s: float | None = None) -> bool:
        """Whether `model_name` is loaded and every stage healthy (the front's readiness).

        Args:
            timeout_s: this check's deadline; default the client's `timeout_s`.

        Returns:
            True when ready; False when not, or when the server cannot be reached.
        """
        try:
            return bool(
                self._call(lambda c, kw: c.is_model_ready(self.model_name, **kw), timeout_s=timeout_s, retry=False)
            )
        except (ServerUnavailableError, DeadlineExceededError):
            return False

    def wait_until_ready(self, timeout_s: float = 60.0, *, poll_interval_s: float = 0.5) -> None:
        """Polls `is_ready` until it says yes.

        Args:
            timeout_s: how long to wait in all.
            poll_interval_s: pause between checks.

        Raises:
            ServerUnavailableError: not ready within `timeout_s`; ValueError for a negative or infinite wait.
        """
        self._check_wait_args(timeout_s, poll_interval_s)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining > 0 and self.is_ready(timeout_s=min(self.timeout_s, remaining)):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailableError(
                    f"model {self.model_name!r} at {self.url} not ready within {timeout_s:g} s"
                )
            time.sleep(min(poll_interval_s, remaining))
