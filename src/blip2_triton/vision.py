"""Vision stage: image bytes -> projected Q-Former query embeddings (`get_image_features` + projection)."""

from __future__ import annotations

import io
import logging
import re
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import LoadedStage, load_stage
from .compute_lock import ComputeLock
from .embedding_cache import EmbeddingCache
from .errors import InvalidRequestError
from .options import ServerOptions
from .requests import ImageRequest

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})
# A progressive JPEG re-walks every block of the image once per scan, so a small file with thousands of tiny
# scans costs minutes of CPU at the pixel limit. Encoders write about 10; libjpeg-turbo's own tools cap at 500.
MAX_JPEG_SCANS = 500
_JPEG_SOS = b"\xff\xda"
# Decoder messages may name files or objects of the server process; clients get them without.
_UNSAFE_DETAIL = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s:;,)]+|<[^>]*>|0x[0-9a-fA-F]+")


def _client_detail(error: BaseException) -> str:
    text = _UNSAFE_DETAIL.sub("…", str(error)).strip()
    return (text[:160] + "…" if len(text) > 160 else text) or type(error).__name__


def decode_image(request: ImageRequest, options: ServerOptions) -> Image.Image:
    """Decodes like the HF reference (`Image.open(f).convert("RGB")`), within the configured limits.

    Animated images yield their first frame; EXIF orientation is not applied, as in the reference. No draft or
    reduced decoding: an image within the limits decodes to exactly the reference's pixels.
    """
    request.validate(options)
    if options.max_image_pixels != Image.MAX_IMAGE_PIXELS:
        # PIL refuses at open() beyond twice its own limit, before the configured check below runs. Tied to the
        # configured limit, PIL lets every image within it through (a raised limit used to be cut at ~179 MP).
        Image.MAX_IMAGE_PIXELS = options.max_image_pixels
    try:
        with warnings.catch_warnings():
            # PIL warns about corrupt metadata and at its own bomb limit (ours below decides); per-request
            # warnings from untrusted input would only flood the server log.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(request.data))
            fmt = img.format or "unknown"
            if fmt not in ACCEPTED_FORMATS:
                raise InvalidRequestError(
                    f"image: expected JPEG, PNG, WebP, BMP, GIF or TIFF, got {fmt}"
                )
            width, height = img.size
            if width < 1 or height < 1:
                raise InvalidRequestError(f"image: expected non-empty dimensions, got {width}x{height}")
            if width * height > options.max_image_pixels:
                raise InvalidRequestError(
                    f"image: expected at most {options.max_image_pixels} pixels, got {width}x{height}"
                )
            if fmt in ("JPEG", "MPO"):
                # Stuffing turns every 0xFF of entropy-coded data into FF 00, so FF DA is always a marker.
                scans = request.data.count(_JPEG_SOS)
                if scans > MAX_JPEG_SCANS:
                    raise InvalidRequestError(f"image: expected at most {MAX_JPEG_SCANS} JPEG scans, got {scans}")
            img.load()
            return img.convert("RGB")
    except InvalidRequestError:
        raise
    except Image.DecompressionBombError as e:
        # PIL refuses at open() beyond twice its own limit, before our dimension check can run.
        raise InvalidRequestError(
            f"image: expected at most {options.max_image_pixels} pixels, got a larger image"
        ) from e
    except UnidentifiedImageError as e:
        raise InvalidRequestError("image: bytes are not a supported image file") from e
    except MemoryError:
        # Within the pixel limit this is the server running short, not the request's fault.
        raise
    except Exception as e:
        # Any other decoder failure on untrusted bytes (PIL raises OSError, SyntaxError, ValueError, EOFError,
        # struct.error, IndexError, ... on malformed files) is this request's problem alone.
        raise InvalidRequestError(f"image: corrupt or truncated image data ({_client_detail(e)})") from e


class VisionStage:
    def __init__(self, options: ServerOptions, loaded: LoadedStage | None = None) -> None:
        self.options = options
        self.loaded = loaded or load_stage("vision", options)
        self.model = self.loaded.model
        self.image_processor = self.loaded.processor.image_processor
        config = self.loaded.config
        self.num_query_tokens = int(config.num_query_tokens)
        self.output_width = int(config.text_config.hidden_size)
        self.cache = EmbeddingCache(options.embedding_cache_bytes, self.model_identity)
        self.compute = ComputeLock.for_stage(options.compute_lock, options.compute_lock_file)
        if self.cache.enabled:
            log.info("embedding cache: up to %d bytes", self.cache.max_bytes)

    @property
    def model_identity(self) -> str:
        # Everything that changes the embeddings of given bytes: the checkpoint, the compute dtype and the
        # quantisation (the device only adds float noise, but a cache never outlives its process anyway).
        return f"{self.loaded.source}|{self.loaded.dtype}|{self.options.quantization}"

    @property
    def output_shape(self) -> tuple[int, int]:
        return (self.num_query_tokens, self.output_width)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def embed(self, images: list[Image.Image]) -> np.ndarray:
        pixel_values = self.preprocess(images).to(self.loaded.device)
        with self.compute:
            features = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        # Transported as FP32 between stages: exact for fp16/bf16 values, so the LLM stage casts back losslessly.
        return features.float().cpu().numpy()

    def run(self, requests: list[ImageRequest]) -> list[np.ndarray | InvalidRequestError]:
        """One result per request: its embeddings, or the error that belongs to that request alone.

        Cached images skip decoding and the model; an image repeated within the batch is computed once.
        """
        results: list[np.ndarray | InvalidRequestError] = [np.empty(0)] * len(requests)
        images: list[Image.Image] = []
        keys: list[bytes | None] = []
        # Slots waiting for each image computed in this batch, by position in `images`.
        waiting: list[list[int]] = []
        pending: dict[bytes, int] = {}
        for slot, req in enumerate(requests):
            key = None
            if self.cache.enabled:
                try:
                    # The size check is cheap and keeps oversized payloads from being hashed at all.
                    req.validate(self.options)
                except InvalidRequestError as e:
                    results[slot] = e
                    continue
                key = self.cache.key(bytes(req.data))
                if key in pending:
                    self.cache.count_hit()
                    waiting[pending[key]].append(slot)
                    continue
                cached = self.cache.get(key)
                if cached is not None:
                    results[slot] = cached
                    continue
            try:
                images.append(decode_image(req, self.options))
            except InvalidRequestError as e:
                results[slot] = e
                continue
            if key is not None:
                pending[key] = len(waiting)
            keys.append(key)
            waiting.append([slot])
        if images:
            embeds = self.embed(images)
            for key, slots, emb in zip(keys, waiting, embeds, strict=True):
                if key is not None:
                    self.cache.put(key, emb)
                for slot in slots:
                    results[slot] = emb
        return results
