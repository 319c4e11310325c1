"""Per-request inputs of the two stages, validated before any batch work starts."""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass

import numpy as np

from .errors import InvalidRequestError
from .options import ServerOptions

# Upper bound on the UTF-8 size of one token of the BPE vocabularies BLIP-2 uses (OPT/GPT-2's longest are runs of
# 64 repeated characters; T5's sentencepiece pieces are shorter).
MAX_BYTES_PER_TOKEN = 128


# An `image` sent as text (JSON clients): a data URL, or plain base64 of the file.
_DATA_URL = re.compile(rb"data:image/[\w.+-]+;base64,", re.IGNORECASE)
_BASE64 = re.compile(rb"[A-Za-z0-9+/\r\n]+={0,2}\s*")


def image_file_bytes(data: bytes) -> bytes:
    """The image file itself: `data` unchanged, or decoded from a base64 data URL or plain base64 text.

    No image format starts with base64 characters only (their magic numbers hold bytes outside that alphabet), so a
    file is never taken for text.
    """
    if data[:5].lower() == b"data:":
        header = _DATA_URL.match(data)
        if header is None:
            raise InvalidRequestError("image: expected a base64 data URL of an image type (data:image...;base64,), "
                                      "got a data URL of another form")
        try:
            return base64.b64decode(data[header.end():])
        except binascii.Error as e:
            raise InvalidRequestError(f"image: expected base64 after the data URL header, got malformed base64 "
                                      f"({e})") from e
    if not _BASE64.fullmatch(data):
        return data
    try:
        return base64.b64decode(data)
    except binascii.Error:
        return data  # not base64 after all: the decoder names it an unsupported file


@dataclass
class ImageRequest:
    # Encoded image file bytes; `validate` turns base64 text into them.
    data: bytes

    def validate(self, options: ServerOptions) -> None:
        if not isinstance(self.data, bytes | bytearray):
            raise InvalidRequestError(f"image: expected encoded image bytes, got {type(self.data).__name__}")
        if len(self.data) == 0:
            raise InvalidRequestError("image: expected encoded image bytes, got 0 bytes")
        # Base64 carries 3 bytes in 4 characters; a data URL adds a short header.
        if len(self.data) > options.max_image_bytes * 4 // 3 + 64:
            raise InvalidRequestError(f"image: expected at most {options.max_image_bytes} bytes, got {len(self.data)}")
        self.data = image_file_bytes(bytes(self.data))
        if len(self.data) > options.max_image_bytes:
            raise InvalidRequestError(f"image: expected at most {options.max_image_bytes} bytes, got {len(self.data)}")


@dataclass
class GenerationRequest:
    query_embeds: np.ndarray
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    beam_width: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    @property
    def do_sample(self) -> bool:
        # temperature 0 is the common "greedy" spelling (OpenAI, vLLM); top_p/top_k alone imply sampling.
        if self.temperature is not None and self.temperature == 0.0:
            return False
        return self.temperature is not None or self.top_p is not None or (self.top_k is not None and self.top_k > 0)

    @property
    def num_beams(self) -> int:
        return self.beam_width or 1

    def validate(self, options: ServerOptions, *, expected_embeds_shape: tuple[int, int]) -> None:
        if self.query_embeds.shape != expected_embeds_shape:
            raise InvalidRequestError(
                f"_query_embeds: expected shape {list(expected_embeds_shape)}, got {list(self.query_embeds.shape)}"
            )
        if not np.isfinite(self.query_embeds).all():
            raise InvalidRequestError("_query_embeds: expected finite values, got NaN or inf")
        if self.prompt is not None and "\x00" in self.prompt:
            raise InvalidRequestError("text_input: NUL characters are not allowed")
        if self.prompt is not None:
            # Checked before tokenizing: a multi-megabyte prompt would cost the whole batch seconds of CPU only to
            # be refused by the token limit. No BPE token is longer than this, so every refused prompt is one the
            # token limit would refuse too.
            limit = options.max_prompt_tokens * MAX_BYTES_PER_TOKEN
            size = len(self.prompt.encode("utf-8", errors="surrogatepass"))
            if size > limit:
                raise InvalidRequestError(f"text_input: expected at most {limit} bytes, got {size}")
        if self.max_tokens is None:
            self.max_tokens = options.default_max_tokens
        if not 1 <= self.max_tokens <= options.max_max_tokens:
            raise InvalidRequestError(
                f"max_tokens: expected 1..{options.max_max_tokens}, got {self.max_tokens}"
            )
        if self.temperature is not None and (not math.isfinite(self.temperature) or self.temperature < 0):
            raise InvalidRequestError(f"temperature: expected a finite value >= 0, got {self.temperature}")
        if self.top_p is not None and (not math.isfinite(self.top_p) or not 0 < self.top_p <= 1):
            raise InvalidRequestError(f"top_p: expected 0 < top_p <= 1, got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise InvalidRequestError(f"top_k: expected >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty is not None and (
            not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0
        ):
            raise InvalidRequestError(f"repetition_penalty: expected a finite value > 0, got {self.repetition_penalty}")
        if self.beam_width is not None and not 1 <= self.beam_width <= options.max_beam_width:
            raise InvalidRequestError(f"beam_width: expected 1..{options.max_beam_width}, got {self.beam_width}")
        if self.num_beams > 1 and self.do_sample:
            raise InvalidRequestError("beam_width > 1 cannot be combined with sampling (temperature/top_p/top_k)")
