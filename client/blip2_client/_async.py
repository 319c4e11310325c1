from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from functools import partial
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ._base import _ClientConfig
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
from ._sync import _tc as _inputs_tc

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    if sys.version_info >= (3, 11):
        from typing import Self, Unpack
    else:
        from typing_extensions import Self, Unpack

    from ._request import Controls

T = TypeVar("T")
AsyncOp = Callable[[Any, dict[str, Any]], Awaitable[Any]]


def _tc(protocol: str) -> ModuleType:
    if protocol == "grpc":
        import tritonclient.grpc.aio as tc
    else:
        import tritonclient.http.aio as tc
    module: ModuleType = tc
    return module


class AsyncBlip2Client(_ClientConfig):
    """asyncio client for the `blip2` ensemble (tritonclient.grpc.aio / tritonclient.http.aio).

    Create it anywhere; the connection is opened lazily inside the running event
    loop. Use one instance per event loop.
    """

    def _init_state(self) -> None:
        self._aclient: Any = None
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection; idempotent. The client cannot be used afterwards."""
        self._closed = True
        client, self._aclient = self._aclient, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    def _client(self) -> Any:
        if self._closed:
            raise RuntimeError("AsyncBlip2Client is closed")
        if self._aclient is None:
            tc = _tc(self._protocol)
            if self._protocol == "grpc":
                self._aclient = tc.InferenceServerClient(self._hostport, ssl=self._ssl)
            else:
                self._aclient = tc.InferenceServerClient(
                    self._hostport,
                    ssl=self._ssl,
                    conn_timeout=self.timeout_s,
                    conn_limit=max(self.max_concurrency, 8),
                )
        return self._aclient

    async def _once(self, op: AsyncOp, timeout_s: float) -> Any:
        client = self._client()
        kw = {"client_timeout": timeout_s} if self._protocol == "grpc" else {}
        try:
            # The transports' own deadlines should fire first; wait_for is the
            # backstop that makes the deadline hold whatever they do.
            return await asyncio.wait_for(op(client, kw), timeout_s)
        except Blip2Error:
            raise
        except Exception as e:
            raise self._mapped(e, timeout_s) from e

    async def _call(self, op: AsyncOp, *, timeout_s: float | None = None, retry: bool = True) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        attempt = 0
        while True:
            try:
                return await self._once(op, timeout_s)
            except ServerUnavailableError:
                if not retry or attempt >= self.retries:
                    raise
                await asyncio.sleep(self._backoff_s(attempt))
                attempt += 1

    async def _infer(self, image: bytes, prompt: str | None, controls: dict[str, Any]) -> str:
        tc = _inputs_tc(self._protocol)
        inputs = build_inputs(tc, image, prompt, controls)
        outputs = requested_outputs(tc)

        async def op(c: Any, kw: dict[str, Any]) -> str:
            return decode_text(await c.infer(self.model_name, inputs, outputs=outputs, **kw))

        text: str = await self._call(op)
        return text

    async def _infer_detailed(self, image: bytes, prompt: str | None, controls: dict[str, Any]) -> Generation:
        inputs = build_inputs(_inputs_tc(self._protocol), image, prompt, controls)

        async def op(c: Any, kw: dict[str, Any]) -> Generation:
            return decode_generation(await c.infer(self.model_name, inputs, **kw))

        result: Generation = await self._call(op)
        return result

    async def _gather(self, jobs: list[Callable[[], Awaitable[T]]]) -> list[T]:
        sem = asyncio.Semaphore(self.max_concurrency)

        async def bounded(job: Callable[[], Awaitable[T]]) -> T:
            async with sem:
                return await job()

        tasks = [asyncio.ensure_future(bounded(job)) for job in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            # gather() leaves the other tasks running after the first failure.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- generation ----------------------------------------------------------------

    async def generate(self, image: ImageInput, prompt: str | None = None, **controls: Unpack[Controls]) -> str:
        """Generate text for one image.

        Args:
            image: a path, bytes, binary file, PIL image or uint8 array.
            prompt: the text prompt (e.g. `Question: ... Answer:`); None or empty asks for a caption.
            **controls: `max_tokens`, `temperature`, `top_p`, `top_k`, `beam_width`, `repetition_penalty`, `seed`.

        Returns:
            The generated continuation, stripped.

        Raises:
            InvalidInputError, ServerUnavailableError, DeadlineExceededError, Blip2Error: as
            `Blip2Client.generate`; TypeError / ValueError for arguments the client cannot send.
        """
        control_tensors(controls)
        return await self._infer(encode_image(image), prompt, dict(controls))

    async def generate_result(self, image: ImageInput, prompt: str | None = None,
                              **controls: Unpack[Controls]) -> Generation:
        """`generate`, with what the server reports: a `Generation` (`text`, `finish_reason`, `output_tokens`,
        `input_tokens`; None where the server reports nothing).

        Raises:
            As `generate`.
        """
        control_tensors(controls)
        return await self._infer_detailed(encode_image(image), prompt, dict(controls))

    async def caption(self, image: ImageInput, **controls: Unpack[Controls]) -> str:
        """A caption of the image (`generate` with no prompt). Returns / Raises: as `generate`."""
        return await self.generate(image, None, **controls)

    async def ask(self, image: ImageInput, question: str, **controls: Unpack[Controls]) -> str:
        """The answer to `question` (`generate` with `Question: {question} Answer:`). Returns / Raises: as
        `generate`."""
        return await self.generate(image, vqa_prompt(question), **controls)

    async def generate_batch(
        self,
        images: Iterable[ImageInput],
        prompts: str | Sequence[str | None] | None = None,
        **controls: Unpack[Controls],
    ) -> list[str]:
        """`generate` for each image, at most `max_concurrency` in flight.

        Args:
            images: the images; all are encoded before anything is sent.
            prompts: one prompt for all, one per image, or None for captions.
            **controls: as for `generate`.

        Returns:
            The texts, in input order.

        Raises:
            The first failed request's error; ValueError when `prompts` and `images` differ in length.
        """
        control_tensors(controls)
        encoded = [encode_image(img) for img in images]
        per_image = batch_prompts(len(encoded), prompts, "prompts")
        ctl = dict(controls)
        return await self._gather([partial(self._infer, b, p, ctl) for b, p in zip(encoded, per_image, strict=True)])

    async def caption_batch(self, images: Iterable[ImageInput], **controls: Unpack[Controls]) -> list[str]:
        """A caption of each image; texts in input order. Raises: as `generate_batch`."""
        return await self.generate_batch(images, None, **controls)

    async def ask_batch(
        self, images: Iterable[ImageInput], questions: str | Sequence[str], **controls: Unpack[Controls]
    ) -> list[str]:
        """Ask one question of every image, or questions[i] of images[i]. Returns / Raises: as `generate_batch`."""
        if isinstance(questions, str):
            return await self.generate_batch(images, vqa_prompt(questions), **controls)
        return await self.generate_batch(images, [vqa_prompt(q) for q in questions], **controls)

    async def stream(
        self, image: ImageInput, prompt: str | None = None, **controls: Unpack[Controls]
    ) -> AsyncIterator[str]:
        """Async twin of Blip2Client.stream.

        Being an async generator, it raises StreamingUnsupportedError on the first
        iteration rather than at the call.
        """
        control_tensors(controls)
        data = encode_image(image)
        self._check_stream_protocol()
        try:
            await self._call(self._metadata_op(self.stream_model_name), retry=False)
        except Blip2Error as e:
            if self._is_stream_model_missing(e):
                raise self._stream_missing_error() from e
            raise
        inputs = build_inputs(_inputs_tc("grpc"), data, prompt, dict(controls))
        outputs = requested_outputs(_inputs_tc("grpc"))

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self.stream_model_name, "inputs": inputs, "outputs": outputs}

        # stream_timeout is a gRPC deadline on the whole stream; it surfaces as a
        # DEADLINE_EXCEEDED error from the iterator.
        responses = self._client().stream_infer(requests(), stream_timeout=self.timeout_s)
        try:
            async for result, error in responses:
                if error is not None:
                    raise self._mapped(error, self.timeout_s) from error
                if result.as_numpy("text_output") is not None:
                    text = decode_text(result)
                    if text:
                        yield text
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
        except Blip2Error:
            raise
        except Exception as e:
            raise self._mapped(e, self.timeout_s) from e
        finally:
            with contextlib.suppress(Exception):
                responses.cancel()

    # -- retrieval and matching: Blip2Client's methods, awaited ----------------------

    async def _retrieve(
        self, entry: str, image: bytes | None, text: str | None, timeout_s: float | None
    ) -> npt.NDArray[np.float32]:
        tc = _inputs_tc(self._protocol)
        model, (output, ndim) = self._retrieval_model(entry), OUTPUTS[entry]
        inputs, outputs = retrieval_inputs(tc, image, text), [tc.InferRequestedOutput(output)]

        async def op(c: Any, kw: dict[str, Any]) -> npt.NDArray[np.float32]:
            return output_array(await c.infer(model, inputs, outputs=outputs, **kw), output, ndim)

        result: npt.NDArray[np.float32] = await self._call(op, timeout_s=timeout_s)
        return result

    async def embed_image(self, image: ImageInput, *, timeout_s: float | None = None) -> npt.NDArray[np.float32]:
        """Async twin of `Blip2Client.embed_image`: float32 [num_query_tokens, embed_dim], rows of unit length.

        Raises:
            InvalidInputError: the server could not use the image; other `Blip2Error`s as for `generate`.
        """
        return await self._retrieve("embed_image", encode_image(image), None, timeout_s)

    async def embed_text(self, text: str, *, timeout_s: float | None = None) -> npt.NDArray[np.float32]:
        """Async twin of `Blip2Client.embed_text`: float32 [embed_dim] of unit length.

        Raises:
            InvalidInputError: empty text, text over the server's limit, ...; TypeError: `text` is not a str.
        """
        return await self._retrieve("embed_text", None, check_text(text), timeout_s)

    async def similarity(self, image: ImageInput, text: str, *, timeout_s: float | None = None) -> float:
        """Async twin of `Blip2Client.similarity`: the pair's contrastive score.

        Raises:
            InvalidInputError: the server could not use the image or the text (the message names which).
        """
        return float((await self._retrieve("similarity", encode_image(image), check_text(text), timeout_s))[0])

    async def match(self, image: ImageInput, text: str, *, timeout_s: float | None = None) -> float:
        """Async twin of `Blip2Client.match`: P(the text describes the image).

        Raises:
            InvalidInputError: the server could not use the image or the text (the message names which).
        """
        return float((await self._retrieve("match", encode_image(image), check_text(text), timeout_s))[0])

    async def embed_image_batch(
        self, images: Iterable[ImageInput], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.float32]:
        """Concurrent `embed_image` (at most `max_concurrency` in flight): float32 [images, queries, dim].

        Raises:
            The first failed request's error.
        """
        return stacked(await self._gather(batch_jobs(self._retrieve, "embed_image", timeout_s, images=images)), 2)

    async def embed_text_batch(
        self, texts: Iterable[str], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.float32]:
        """Concurrent `embed_text`: float32 [texts, embed_dim].

        Raises:
            The first failed request's error.
        """
        return stacked(await self._gather(batch_jobs(self._retrieve, "embed_text", timeout_s, texts=texts)), 1)

    async def similarity_batch(
        self, images: Iterable[ImageInput], texts: str | Sequence[str], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.float32]:
        """Concurrent `similarity` of images[i] with one text, or with texts[i]: float32 [images].

        Raises:
            The first failed request's error; ValueError when the counts differ.
        """
        return await self._pairs("similarity", images, texts, timeout_s)

    async def match_batch(
        self, images: Iterable[ImageInput], texts: str | Sequence[str], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.float32]:
        """Concurrent `match` of images[i] with one text, or with texts[i]: float32 [images].

        Raises:
            The first failed request's error; ValueError when the counts differ.
        """
        return await self._pairs("match", images, texts, timeout_s)

    async def _pairs(
        self, entry: str, images: Iterable[ImageInput], texts: str | Sequence[str], timeout_s: float | None
    ) -> npt.NDArray[np.float32]:
        jobs = batch_jobs(self._retrieve, entry, timeout_s, images=images, texts=texts)
        return stacked(await self._gather(jobs), 1).reshape(-1)

    # -- health and metadata ---------------------------------------------------------

    def _metadata_op(self, model_name: str) -> AsyncOp:
        if self._protocol == "grpc":
            return lambda c, kw: c.get_model_metadata(model_name, as_json=True, **kw)
        return lambda c, kw: c.get_model_metadata(model_name, **kw)

    async def model_metadata(self) -> ModelMetadata:
        """The served model's name, versions, inputs and outputs. Raises: as `Blip2Client.model_metadata`."""
        return ModelMetadata.from_dict(await self._call(self._metadata_op(self.model_name)))

    async def is_live(self) -> bool:
        """Whether the server answers at all; False (not an error) when it cannot be reached."""
        try:
            return bool(await self._call(lambda c, kw: c.is_server_live(**kw), retry=False))
        except (ServerUnavailableError, DeadlineExceededError):
            return False

    async def is_ready(self, *, timeout_s: float | None = None) -> bool:
        """Whether `model_name` is loaded and every stage healthy; False when not or unreachable."""
        try:
            return bool(
                await self._call(
                    lambda c, kw: c.is_model_ready(self.model_name, **kw), timeout_s=timeout_s, retry=False
                )
            )
        except (ServerUnavailableError, DeadlineExceededError):
            return False

    async def wait_until_ready(self, timeout_s: float = 60.0, *, poll_interval_s: float = 0.5) -> None:
        """Polls `is_ready` until it says yes. Raises ServerUnavailableError when not ready within `timeout_s`."""
        self._check_wait_args(timeout_s, poll_interval_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining > 0 and await self.is_ready(timeout_s=min(self.timeout_s, remaining)):
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ServerUnavailableError(
                    f"model {self.model_name!r} at {self.url} not ready within {timeout_s:g} s"
                )
            await asyncio.sleep(min(poll_interval_s, remaining))
