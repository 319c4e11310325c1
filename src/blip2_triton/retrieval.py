"""Image-text retrieval and matching: BLIP-2's stage-1 heads (`Blip2ForImageTextRetrieval`), in-process.

Four steps, each computing exactly what `Blip2ForImageTextRetrieval.forward` computes for its part:

* image stage: image bytes -> normalised per-query image embeddings [num_query_tokens, image_text_hidden_size]
  (ViT, Q-Former over the learned queries, `vision_projection`, L2 norm) and, for matching, the ViT's
  `last_hidden_state` [patches + 1, vision_hidden_size]. Both are cached by image bytes.
* text stage: text -> normalised text embedding [image_text_hidden_size] (Q-Former text path, `text_projection` of
  the [CLS] position, L2 norm).
* similarity: (image embeddings, text embedding) -> the contrastive score, the largest dot product over the queries
  (`logits_per_image` with `use_image_text_matching_head=False`; no temperature).
* matching: (ViT features, text) -> ITM probability, softmax of the ITM head's two logits averaged over the queries,
  index 1 = match (`use_image_text_matching_head=True`).

Each stage loads only its own weights from the checkpoint; sizes come from the checkpoint. Results are per request:
a bad row gets its `InvalidRequestError` while its neighbours in the batch get their results.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from transformers import Blip2Config, Blip2ForImageTextRetrieval
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings, Blip2VisionModel

from .checkpoint import TINY_ITM_FAMILY, LoadedStage, load_stage_model, resolve_model_source
from .compute_lock import ComputeLock
from .embedding_cache import EmbeddingCache
from .errors import ConfigurationError, InvalidRequestError
from .options import ServerOptions
from .requests import MAX_BYTES_PER_TOKEN, ImageRequest
from .vision import decode_image
from .vision.preprocess import ImagePreprocessor

log = logging.getLogger(__name__)


class _StageModel(Blip2ForImageTextRetrieval):
    """Base of the stage models: subclassing keeps the full model's parameter names, fp32 modules and quantisation
    rules, so `from_pretrained` reads a stage's tensors from the full checkpoint and skips the rest."""

    def __init__(self, config: Blip2Config) -> None:
        super(Blip2ForImageTextRetrieval, self).__init__(config)
        self.build(config)
        self.post_init()

    def build(self, config: Blip2Config) -> None:
        raise NotImplementedError

    def _query_tokens(self, config: Blip2Config) -> nn.Parameter:
        return nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))

    def _qformer(self, config: Blip2Config, *, drop: tuple[str, ...] = ()) -> Blip2QFormerModel:
        """The Q-Former without the per-layer modules in `drop`, which this stage's path never runs (the
        checkpoint's tensors for them are skipped through `_keys_to_ignore_on_load_unexpected`)."""
        qformer = Blip2QFormerModel._from_config(config.qformer_config)
        for layer in qformer.encoder.layer:
            for name in drop:
                if hasattr(layer, name):
                    delattr(layer, name)
            layer.has_cross_attention = hasattr(layer, "crossattention")
        return qformer


# Per Q-Former layer: the queries' FFN and cross-attention run only where queries are in the sequence; the text FFN
# only where text is.
_QUERY_ONLY = ("crossattention", "intermediate_query", "output_query")
_TEXT_ONLY = ("intermediate", "output")


def _unexpected(prefixes: tuple[str, ...], layer_modules: tuple[str, ...] = ()) -> list[str]:
    patterns = [rf"^{p}" for p in prefixes]
    if layer_modules:
        patterns.append(rf"^qformer\.encoder\.layer\.\d+\.({'|'.join(layer_modules)})\.")
    return patterns


class RetrievalImageStageModel(_StageModel):
    """ViT + Q-Former over the learned queries + `vision_projection`."""

    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = _unexpected(
        (r"embeddings\.", r"text_projection\.", r"itm_head\."), _TEXT_ONLY
    )

    def build(self, config: Blip2Config) -> None:
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.query_tokens = self._query_tokens(config)
        self.qformer = self._qformer(config, drop=_TEXT_ONLY)
        self.vision_projection = nn.Linear(config.qformer_config.hidden_size, config.image_text_hidden_size)

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding


class RetrievalTextStageModel(_StageModel):
    """Text embeddings + Q-Former (text path) + `text_projection`."""

    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = _unexpected(
        (r"vision_model\.", r"query_tokens", r"vision_projection\.", r"itm_head\."), _QUERY_ONLY
    )

    def build(self, config: Blip2Config) -> None:
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = self._qformer(config, drop=_QUERY_ONLY)
        self.text_projection = nn.Linear(config.qformer_config.hidden_size, config.image_text_hidden_size)


class RetrievalMatchStageModel(_StageModel):
    """Learned queries + text embeddings + Q-Former (queries and text over the ViT features) + ITM head."""

    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = _unexpected(
        (r"vision_model\.", r"vision_projection\.", r"text_projection\.")
    )

    def build(self, config: Blip2Config) -> None:
        self.query_tokens = self._query_tokens(config)
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = self._qformer(config)
        self.itm_head = nn.Linear(config.qformer_config.hidden_size, 2)


STAGE_MODELS: dict[str, type[_StageModel]] = {
    "image": RetrievalImageStageModel,
    "text": RetrievalTextStageModel,
    "match": RetrievalMatchStageModel,
}


def load_retrieval_stage(stage: str, options: ServerOptions) -> LoadedStage:
    """`options.model_id` names the retrieval checkpoint; empty serves the embedded tiny one."""
    if stage not in STAGE_MODELS:
        raise ValueError(f"stage must be one of {', '.join(STAGE_MODELS)}, got {stage!r}")
    source = resolve_model_source(options, tiny_family=TINY_ITM_FAMILY)
    try:
        config = Blip2Config.from_pretrained(source, trust_remote_code=False)
    except OSError as e:
        raise ConfigurationError(f"cannot load BLIP-2 checkpoint {source!r}: {e}") from e
    if not config.qformer_config.use_qformer_text_input:
        # A captioning checkpoint has no text embeddings, projections or ITM head: from_pretrained would fill them
        # with random weights and serve noise.
        raise ConfigurationError(
            f"checkpoint {source!r} is not an image-text retrieval checkpoint (its Q-Former takes no text input); "
            "expected one like Salesforce/blip2-itm-vit-g"
        )
    return load_stage_model(STAGE_MODELS[stage], f"itm-{stage}", source, options)


def model_identity(loaded: LoadedStage, options: ServerOptions) -> str:
    # Everything that changes a stage's outputs for given inputs: checkpoint, compute dtype, quantisation.
    return f"{loaded.source}|{loaded.dtype}|{options.quantization}"


@dataclass
class RetrievalImageRequest:
    data: bytes
    # What the request needs: the image embeddings (embedding, similarity) and/or the ViT features (matching).
    image_embeds: bool = True
    vision_features: bool = False

    def validate(self, options: ServerOptions) -> None:
        if not (self.image_embeds or self.vision_features):
            raise InvalidRequestError("image: expected a request for image_embeds or _vision_features, got neither")
        image = ImageRequest(self.data)
        image.validate(options)
        # The file itself (base64 text decoded), so a file and its base64 form share cache entries.
        self.data = image.data


@dataclass
class ImageOutputs:
    # float32; None where the request did not ask for it.
    image_embeds: np.ndarray | None = None
    vision_features: np.ndarray | None = None


@dataclass
class TextRequest:
    text: str | None

    def validate(self, options: ServerOptions, *, max_tokens: int) -> None:
        if self.text is None:
            raise InvalidRequestError("text_input: required input is missing")
        if not isinstance(self.text, str):
            raise InvalidRequestError(f"text_input: expected text, got {type(self.text).__name__}")
        if not self.text:
            raise InvalidRequestError("text_input: expected non-empty text, got an empty string")
        if not self.text.strip():
            raise InvalidRequestError("text_input: expected non-empty text, got only whitespace")
        if "\x00" in self.text:
            raise InvalidRequestError("text_input: NUL characters are not allowed")
        # Checked before tokenizing, so a multi-megabyte text cannot cost the batch seconds of CPU. A separate limit
        # from the token count: WordPiece drops whitespace and maps a long word to one [UNK].
        limit = max_tokens * MAX_BYTES_PER_TOKEN
        size = len(self.text.encode("utf-8", errors="surrogatepass"))
        if size > limit:
            raise InvalidRequestError(f"text_input: expected at most {limit} bytes, got {size}")


def _check_array(name: str, array: object, shape: tuple[int, ...]) -> None:
    if not isinstance(array, np.ndarray):
        raise InvalidRequestError(f"{name}: expected an array, got {type(array).__name__}")
    if array.shape != shape:
        raise InvalidRequestError(f"{name}: expected shape {list(shape)}, got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise InvalidRequestError(f"{name}: expected finite values, got NaN or inf")


@dataclass
class MatchRequest:
    vision_features: np.ndarray
    text: str | None

    def validate(self, options: ServerOptions, *, features_shape: tuple[int, int], max_tokens: int) -> None:
        _check_array("_vision_features", self.vision_features, features_shape)
        TextRequest(self.text).validate(options, max_tokens=max_tokens)


@dataclass
class SimilarityRequest:
    image_embeds: np.ndarray
    text_embeds: np.ndarray

    def validate(self, *, image_shape: tuple[int, int], text_shape: tuple[int]) -> None:
        _check_array("_image_embeds", self.image_embeds, image_shape)
        _check_array("_text_embeds", self.text_embeds, text_shape)


def contrastive_similarity(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """HF's `logits_per_image`: [images, queries, dim] x [texts, dim] -> [images, texts], the largest dot product
    of each normalised query embedding with the normalised text embedding (cosine similarity, no temperature).

    Always in float32: with an fp16/bf16 model HF rounds the scores to that dtype, which can tie close ones."""
    scores = torch.matmul(torch.as_tensor(image_embeds), torch.as_tensor(text_embeds).t())
    return scores.max(dim=1).values.numpy()


def run_similarity(
    requests: Sequence[SimilarityRequest], *, image_shape: tuple[int, int], text_shape: tuple[int]
) -> list[float | InvalidRequestError]:
    """One score per (image embeddings, text embedding) pair; weightless, so any process can run it."""
    results: list[float | InvalidRequestError] = []
    for req in requests:
        try:
            req.validate(image_shape=image_shape, text_shape=text_shape)
        except InvalidRequestError as e:
            results.append(e)
            continue
        image = np.asarray(req.image_embeds, dtype=np.float32)[None]
        text = np.asarray(req.text_embeds, dtype=np.float32)[None]
        results.append(float(contrastive_similarity(image, text)[0, 0]))
    return results


class _Stage:
    stage = ""

    def __init__(self, options: ServerOptions, loaded: LoadedStage | None = None) -> None:
        self.options = options
        self.loaded = loaded or load_retrieval_stage(self.stage, options)
        self.model = self.loaded.model
        self.config: Blip2Config = self.loaded.config
        self.device = self.loaded.device
        self.compute = ComputeLock.for_stage(options.compute_lock, options.compute_lock_file)

    @property
    def embed_dim(self) -> int:
        return int(self.config.image_text_hidden_size)

    @property
    def features_shape(self) -> tuple[int, int]:
        vision = self.config.vision_config
        return ((vision.image_size // vision.patch_size) ** 2 + 1, int(vision.hidden_size))


class _TextInput(_Stage):
    """Tokenizes as `Blip2Processor` does for this checkpoint, once the model has stripped the image tokens the
    processor puts in front of the text when it also gets images."""

    def __init__(self, options: ServerOptions, loaded: LoadedStage | None = None) -> None:
        super().__init__(options, loaded)
        self.tokenizer = self.loaded.processor.tokenizer
        qformer = self.config.qformer_config
        self.vocab_size = int(qformer.vocab_size)
        # Text positions are the Q-Former's position embeddings; the server's prompt limit may be lower.
        self.max_text_tokens = min(int(qformer.max_position_embeddings), options.max_prompt_tokens)
        self.pad_token_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        # What a text without words encodes to ([CLS] [SEP] for BERT); [UNK] is a word.
        self._empty_ids = list(self.tokenizer("", return_token_type_ids=False)["input_ids"])
        image_token = getattr(self.loaded.processor, "image_token", None)
        self.image_token_text = getattr(image_token, "content", None) or str(image_token or "<image>")

    def tokenize(self, request: TextRequest) -> list[int]:
        request.validate(self.options, max_tokens=self.max_text_tokens)
        assert request.text is not None
        return self.token_ids(request.text)

    def token_ids(self, text: str) -> list[int]:
        """The ids of a validated text, or the InvalidRequestError that its tokens earn."""
        ids = list(self.tokenizer(text, return_token_type_ids=False)["input_ids"])
        if any(i >= self.vocab_size for i in ids):
            # The processor's image token (and any other id the Q-Former cannot embed).
            raise InvalidRequestError(f"text_input: must not contain the image token {self.image_token_text!r}")
        if ids == self._empty_ids:
            raise InvalidRequestError("text_input: expected text, got nothing left after tokenization")
        if len(ids) > self.max_text_tokens:
            raise InvalidRequestError(f"text_input: expected at most {self.max_text_tokens} tokens, got {len(ids)}")
        return ids

    def padded(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        # Right padding, as the processor's tokenizer pads; the attention mask hides it.
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)


# The in-flight key of an image request: its cache key and what it asks for.
ImageKey = tuple[bytes, bool, bool]


@dataclass
class PreparedImage:
    """An image's input to `embed_batch`: its decoded pixels, or its cached ViT features (the Q-Former is left)."""

    key: bytes
    pixels: torch.Tensor | None = None
    features: np.ndarray | None = None


class RetrievalImageStage(_Stage):
    """Image bytes -> image embeddings and/or ViT features, each cached by the image bytes.

    The ViT features feed the matching head and are far larger than the embeddings (ViT-g at 224 px: 257 x 1408
    values against 32 x 256), so each cache has its own byte budget and matching traffic cannot evict the
    embeddings. Features are kept whenever the ViT runs: a later match, or embeddings that were evicted, then cost
    only the Q-Former.

    Served by `vision.pipeline.VisionPipeline` (`lookup` on the request thread, `prepare` on the decoders,
    `embed_batch` on the compute thread); `run` is the same three steps for one batch on the calling thread.
    """

    stage = "image"

    def __init__(self, options: ServerOptions, loaded: LoadedStage | None = None) -> None:
        super().__init__(options, loaded)
        self.preprocess = ImagePreprocessor(self.loaded.processor.image_processor)
        self.num_query_tokens = int(self.config.num_query_tokens)
        identity = model_identity(self.loaded, options)
        self.cache = EmbeddingCache(options.embedding_cache_bytes, identity)
        budget = options.features_cache_bytes
        self.features_cache = EmbeddingCache(options.embedding_cache_bytes if budget == -1 else budget, identity)
        log.info("retrieval image stage: embedding cache %d bytes, ViT-feature cache %d bytes",
                 self.cache.max_bytes, self.features_cache.max_bytes)

    @property
    def embeds_shape(self) -> tuple[int, int]:
        return (self.num_query_tokens, self.embed_dim)

    def cache_key(self, request: RetrievalImageRequest) -> bytes:
        """Validates the request (base64 text becomes file bytes first) and keys it, with or without caches: the
        key also finds an image repeated within a batch."""
        # The size check is cheap and keeps oversized payloads from being hashed at all.
        request.validate(self.options)
        return self.cache.key(bytes(request.data))

    def pixels(self, data: bytes) -> torch.Tensor:
        """Decodes and preprocesses one image into the model's pixel values [3, H, W]; safe on any thread."""
        return self.preprocess(decode_image(ImageRequest(data), self.options))

    @torch.inference_mode()
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with self.compute:
            return self.model.vision_model(pixel_values=pixel_values.to(self.device)).last_hidden_state

    @torch.inference_mode()
    def image_embeds(self, features: torch.Tensor) -> torch.Tensor:
        model = self.model
        mask = torch.ones(features.shape[:-1], dtype=torch.long, device=features.device)
        query_tokens = model.query_tokens.expand(features.shape[0], -1, -1)
        with self.compute:
            hidden = model.qformer(
                query_embeds=query_tokens, encoder_hidden_states=features, encoder_attention_mask=mask
            ).last_hidden_state
            hidden = hidden.to(dtype=model.vision_projection.weight.dtype)
            return nn.functional.normalize(model.vision_projection(hidden), dim=-1)

    def lookup(self, request: RetrievalImageRequest) -> tuple[ImageKey, ImageOutputs | None]:
        """Validates the request; its in-flight key and, when the caches hold all it asks for, its outputs."""
        key = self.cache_key(request)
        embeds = self.cache.get(key) if request.image_embeds else None
        features = self.features_cache.get(key) if request.vision_features else None
        done = (embeds is not None or not request.image_embeds) and (features is not None or not
                                                                     request.vision_features)
        outputs = ImageOutputs(image_embeds=embeds, vision_features=features) if done else None
        return (key, request.image_embeds, request.vision_features), outputs

    def joined(self, request: RetrievalImageRequest) -> None:
        (self.cache if request.image_embeds else self.features_cache).count_hit()

    def prepare(self, request: RetrievalImageRequest) -> PreparedImage:
        """Decodes the image, unless only its embeddings are asked for and its ViT features are cached."""
        key = self.cache.key(bytes(request.data))
        if not request.vision_features:
            features = self.features_cache.get(key)
            if features is not None:
                return PreparedImage(key, features=features)
        return PreparedImage(key, pixels=self.pixels(request.data))

    def embed_batch(
        self, items: Sequence[tuple[object, RetrievalImageRequest, PreparedImage]]
    ) -> list[ImageOutputs]:
        """One result per item. An image that appears twice (asked for different outputs) is computed once."""
        features: dict[bytes, np.ndarray] = {}
        vit: dict[bytes, torch.Tensor] = {}
        for _, _, prepared in items:
            if prepared.features is not None:
                features.setdefault(prepared.key, prepared.features)
            elif prepared.pixels is not None:
                vit.setdefault(prepared.key, prepared.pixels)
        vit = {key: pixels for key, pixels in vit.items() if key not in features}
        if vit:
            # FP32 in transport and cache: exact for fp16/bf16 values (the cache stores those in 16 bits), and the
            # Q-Former casts them to its own dtype as it does the ViT's output. One device-to-host copy per batch.
            computed = self.vision_features(torch.stack(list(vit.values()))).float().cpu().numpy()
            for key, row in zip(vit, computed, strict=True):
                features[key] = row
                self.features_cache.put(key, row)
        embeds: dict[bytes, np.ndarray] = {}
        wanted = list(dict.fromkeys(prepared.key for _, request, prepared in items if request.image_embeds))
        if wanted:
            stacked = torch.from_numpy(np.stack([features[key] for key in wanted])).to(self.device)
            for key, row in zip(wanted, self.image_embeds(stacked).float().cpu().numpy(), strict=True):
                embeds[key] = row
                self.cache.put(key, row)
        return [
            ImageOutputs(image_embeds=embeds[prepared.key] if request.image_embeds else None,
                         vision_features=features[prepared.key] if request.vision_features else None)
            for _, request, prepared in items
        ]

    def run(self, requests: Sequence[RetrievalImageRequest]) -> list[ImageOutputs | InvalidRequestError]:
        """One result per request, on the calling thread. Cached outputs skip decoding and the model; an image
        repeated within the batch is computed once."""
        results: list[ImageOutputs | InvalidRequestError] = [ImageOutputs() for _ in requests]
        pending: dict[ImageKey, list[int]] = {}
        for slot, request in enumerate(requests):
            try:
                key, cached = self.lookup(request)
            except InvalidRequestError as e:
                results[slot] = e
                continue
            if cached is not None:
                results[slot] = cached
            elif key in pending:
                self.joined(request)
                pending[key].append(slot)
            else:
                pending[key] = [slot]
        items: list[tuple[ImageKey, RetrievalImageRequest, PreparedImage]] = []
        for key, slots in pending.items():
            try:
                items.append((key, requests[slots[0]], self.prepare(requests[slots[0]])))
            except InvalidRequestError as e:
                for slot in slots:
                    results[slot] = e
        if items:
            for (key, _, _), outputs in zip(items, self.embed_batch(items), strict=True):
                for slot in pending[key]:
                    results[slot] = outputs
        return results


class RetrievalTextStage(_TextInput):
    """Text -> normalised text embedding, as `Blip2TextModelWithProjection` and the contrastive path compute it."""

    stage = "text"

    @property
    def embeds_shape(self) -> tuple[int]:
        return (self.embed_dim,)

    @torch.inference_mode()
    def text_embeds(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        model = self.model
        with self.compute:
            hidden = model.qformer(
                query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=mask
            ).last_hidden_state
            hidden = hidden.to(dtype=model.text_projection.weight.dtype)
            return nn.functional.normalize(model.text_projection(hidden[:, 0, :]), dim=-1)

    def run(self, requests: Sequence[TextRequest]) -> list[np.ndarray | InvalidRequestError]:
        results: list[np.ndarray | InvalidRequestError] = [np.empty(0)] * len(requests)
        rows: list[tuple[int, list[int]]] = []
        for slot, req in enumerate(requests):
            try:
                rows.append((slot, self.tokenize(req)))
            except InvalidRequestError as e:
                results[slot] = e
        if rows:
            embeds = self.text_embeds(*self.padded([ids for _, ids in rows]))
            for (slot, _), emb in zip(rows, embeds.float().cpu().numpy(), strict=True):
                results[slot] = emb
        return results


class RetrievalMatchStage(_TextInput):
    """(ViT features, text) -> ITM match probability, as the `use_image_text_matching_head=True` path computes it."""

    stage = "match"

    @torch.inference_mode()
    def itm_logits(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        model = self.model
        query_tokens = model.query_tokens.expand(features.shape[0], -1, -1)
        queries = query_tokens.shape[1]
        # Queries attend everywhere; the text's padding is hidden from all.
        query_mask = torch.ones(query_tokens.shape[:-1], dtype=mask.dtype, device=mask.device)
        image_mask = torch.ones(features.shape[:-1], dtype=torch.long, device=features.device)
        with self.compute:
            hidden = model.qformer(
                query_embeds=model.embeddings(input_ids=ids, query_embeds=query_tokens),
                query_length=queries,
                attention_mask=torch.cat([query_mask, mask], dim=1),
                encoder_hidden_states=features,
                encoder_attention_mask=image_mask,
            ).last_hidden_state
            hidden = hidden.to(dtype=model.itm_head.weight.dtype)
            return model.itm_head(hidden[:, :queries, :]).mean(dim=1)

    def run(self, requests: Sequence[MatchRequest]) -> list[float | InvalidRequestError]:
        results: list[float | InvalidRequestError] = [0.0] * len(requests)
        rows: list[tuple[int, list[int]]] = []
        for slot, req in enumerate(requests):
            try:
                req.validate(self.options, features_shape=self.features_shape, max_tokens=self.max_text_tokens)
                assert req.text is not None
                rows.append((slot, self.token_ids(req.text)))
            except InvalidRequestError as e:
                results[slot] = e
        if rows:
            features = torch.from_numpy(
                np.stack([np.asarray(requests[slot].vision_features, dtype=np.float32) for slot, _ in rows])
            ).to(self.device)
            logits = self.itm_logits(features, *self.padded([ids for _, ids in rows]))
            probs = torch.softmax(logits.float(), dim=-1)[:, 1].cpu().tolist()
            for (slot, _), prob in zip(rows, probs, strict=True):
                results[slot] = float(prob)
        return results


class SimilarityStage:
    """The contrastive score of (image embeddings, text embedding) pairs. Weightless: only shapes come from the
    checkpoint; served by the text stage, after the image stage (the client computes the same function for local
    search)."""

    def __init__(self, config: Blip2Config) -> None:
        self.image_shape = (int(config.num_query_tokens), int(config.image_text_hidden_size))
        self.text_shape = (int(config.image_text_hidden_size),)

    def run(self, requests: Sequence[SimilarityRequest]) -> list[float | InvalidRequestError]:
        return run_similarity(requests, image_shape=self.image_shape, text_shape=self.text_shape)
