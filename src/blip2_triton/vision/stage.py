"""The vision stage: image bytes -> projected Q-Former query embeddings (`get_image_features` + projection)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..checkpoint import LoadedStage, load_stage
from ..compute_lock import ComputeLock
from ..cuda_graphs import fixed_buffers, quantized
from ..embedding_cache import EmbeddingCache
from ..errors import ConfigurationError, InvalidRequestError
from ..options import ServerOptions
from ..requests import ImageRequest
from .graphs import BucketedForward
from .images import decode_image
from .preprocess import ImagePreprocessor

log = logging.getLogger(__name__)

QUANTIZED = "the vision stage's fixed-buffer forward does not cover bitsandbytes-quantized layers"


class VisionStage:
    def __init__(self, options: ServerOptions, loaded: LoadedStage | None = None) -> None:
        self.options = options
        if options.cuda_graphs == "on" and options.quantization != "none":
            # Refused before loading: the load itself may need a GPU or bitsandbytes this host lacks.
            raise ConfigurationError(f"cuda_graphs=on: {QUANTIZED}")
        self.loaded = loaded or load_stage("vision", options)
        self.model = self.loaded.model
        self.preprocess = ImagePreprocessor(self.loaded.processor.image_processor)
        config = self.loaded.config
        self.num_query_tokens = int(config.num_query_tokens)
        self.output_width = int(config.text_config.hidden_size)
        self.cache = EmbeddingCache(options.embedding_cache_bytes, self.model_identity)
        self.compute = ComputeLock.for_stage(options.compute_lock, options.compute_lock_file)
        if self.cache.enabled:
            log.info("embedding cache: up to %d bytes", self.cache.max_bytes)
        self.fixed: BucketedForward | None = None
        device = self.loaded.device
        reason = QUANTIZED if quantized(self.model) else None
        if fixed_buffers(options.cuda_graphs, reason=reason, device=device, dtype=self.loaded.dtype):
            size = int(config.vision_config.image_size)
            channels = int(self.model.vision_model.embeddings.patch_embedding.in_channels)
            self.fixed = BucketedForward(self._features, pixel_shape=(channels, size, size), device=device,
                                         graphs=device.type == "cuda")
            log.info("vision forward on fixed buffers per batch bucket (%s)",
                     "CUDA graphs" if self.fixed.graphs else "eager, no CUDA device")

    def warm_up(self, max_rows: int) -> None:
        """Captures the CUDA graphs of every batch bucket up to `max_rows` now (nothing without graphs)."""
        if self.fixed is not None:
            self.fixed.capture(max_rows)

    @property
    def graph_bytes(self) -> int:
        """GPU memory held by the captured forward graphs."""
        return self.fixed.graph_bytes if self.fixed is not None else 0

    @property
    def model_identity(self) -> str:
        # Everything that changes the embeddings of given bytes: the checkpoint, the compute dtype and the
        # quantisation (the device only adds float noise, but a cache never outlives its process anyway).
        return f"{self.loaded.source}|{self.loaded.dtype}|{self.options.quantization}"

    @property
    def output_shape(self) -> tuple[int, int]:
        return (self.num_query_tokens, self.output_width)

    def cache_key(self, request: ImageRequest) -> bytes | None:
        """Validates the request (base64 text becomes file bytes first) and keys it; None without a cache."""
        # The size check is cheap and keeps oversized payloads from being hashed at all.
        request.validate(self.options)
        return self.cache.key(bytes(request.data)) if self.cache.enabled else None

    def prepare(self, request: ImageRequest) -> torch.Tensor:
        """Decodes and preprocesses one image into the model's pixel values [3, H, W]; safe on any thread."""
        return self.preprocess(decode_image(request, self.options))

    # The served form (`vision.pipeline.PipelineStage`): lookup on the request thread, prepare on the decoders, compute
    # on the compute thread.
    def lookup(self, request: ImageRequest) -> tuple[bytes | None, np.ndarray | None]:
        key = self.cache_key(request)
        return key, (self.cache.get(key) if key is not None else None)

    def joined(self, request: ImageRequest) -> None:
        self.cache.count_hit()

    def embed_batch(self, items: Sequence[tuple[bytes | None, ImageRequest, torch.Tensor]]) -> list[np.ndarray]:
        embeds = list(self.embed_pixels(torch.stack([pixels for _, _, pixels in items])))
        for (key, _, _), emb in zip(items, embeds, strict=True):
            if key is not None:
                self.cache.put(key, emb)
        return embeds

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    @torch.inference_mode()
    def embed_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        with self.compute:
            if self.fixed is not None:
                features = self.fixed(pixel_values)
            else:
                features = self._features(pixel_values.to(self.loaded.device))
        # Transported as FP32 between stages: exact for fp16/bf16 values, so the LLM stage casts back losslessly.
        return features.float().cpu().numpy()

    def run(self, requests: list[ImageRequest]) -> list[np.ndarray | InvalidRequestError]:
        """One result per request, on the calling thread: its embeddings, or the error that belongs to that request
        alone. Cached images skip decoding and the model; an image repeated within the batch is computed once."""
        results: list[np.ndarray | InvalidRequestError] = [np.empty(0)] * len(requests)
        pixels: list[torch.Tensor] = []
        # Slots waiting for each image computed here, by position in `pixels`, and its cache key.
        waiting: list[tuple[bytes | None, list[int]]] = []
        pending: dict[bytes, int] = {}
        for slot, req in enumerate(requests):
            try:
                key = self.cache_key(req)
                if key is not None and key in pending:
                    self.cache.count_hit()
                    waiting[pending[key]][1].append(slot)
                    continue
                cached = self.cache.get(key) if key is not None else None
                if cached is not None:
                    results[slot] = cached
                    continue
                pixels.append(self.prepare(req))
            except InvalidRequestError as e:
                results[slot] = e
                continue
            if key is not None:
                pending[key] = len(waiting)
            waiting.append((key, [slot]))
        if pixels:
            for (key, slots), emb in zip(waiting, self.embed_pixels(torch.stack(pixels)), strict=True):
                if key is not None:
                    self.cache.put(key, emb)
                for slot in slots:
                    results[slot] = emb
        return results
