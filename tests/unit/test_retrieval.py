"""Retrieval and matching stages in-process (no Triton) against `Blip2ForImageTextRetrieval` on the tiny checkpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import RETRIEVAL_ATOL as ATOL
from reference import RETRIEVAL_TEXTS as TEXTS
from safetensors.torch import load_file
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2Processor,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)

from blip2_triton.checkpoint import ensure_tiny_model, tiny_dirname
from blip2_triton.errors import ConfigurationError, InvalidRequestError
from blip2_triton.options import ServerOptions
from blip2_triton.retrieval import (
    ImageOutputs,
    MatchRequest,
    RetrievalImageRequest,
    RetrievalImageStage,
    RetrievalMatchStage,
    RetrievalTextStage,
    SimilarityRequest,
    SimilarityStage,
    TextRequest,
    contrastive_similarity,
    load_retrieval_stage,
)
from blip2_triton.tiny_itm import write_tiny_itm_model


@pytest.fixture(scope="module")
def options(tiny_itm_model_dir: Path) -> ServerOptions:
    return ServerOptions(model_id=str(tiny_itm_model_dir))


@pytest.fixture(scope="module")
def image_stage(options: ServerOptions) -> RetrievalImageStage:
    return RetrievalImageStage(options)


@pytest.fixture(scope="module")
def text_stage(options: ServerOptions) -> RetrievalTextStage:
    return RetrievalTextStage(options)


@pytest.fixture(scope="module")
def match_stage(options: ServerOptions) -> RetrievalMatchStage:
    return RetrievalMatchStage(options)


@pytest.fixture(scope="module")
def names(sample_images: dict[str, bytes]) -> list[str]:
    return sorted(sample_images)


@pytest.fixture(scope="module")
def hf_batched(itm_reference, sample_images: dict[str, bytes], names: list[str]):  # -> model output
    return itm_reference.contrastive([sample_images[n] for n in names], list(TEXTS))


@pytest.fixture(scope="module")
def hf_single(itm_reference, sample_images: dict[str, bytes], names: list[str]) -> list[list[object]]:
    """transformers' contrastive outputs one (image, text) pair per call: [image][text]."""
    return [[itm_reference.contrastive([sample_images[n]], [t]) for t in TEXTS] for n in names]


@pytest.fixture(scope="module")
def pairs(names: list[str]) -> list[tuple[int, str]]:
    return [(i, t) for i in range(len(names)) for t in TEXTS]


@pytest.fixture(scope="module")
def hf_match_single(itm_reference, sample_images: dict[str, bytes], names: list[str],
                    pairs: list[tuple[int, str]]) -> list[float]:
    return [itm_reference.match([sample_images[names[i]]], [t])[0] for i, t in pairs]


def _ok(result: object) -> object:
    assert not isinstance(result, Exception), result
    return result


def _outputs(stage: RetrievalImageStage, images: list[bytes], **wants: bool) -> list[ImageOutputs]:
    return [_ok(r) for r in stage.run([RetrievalImageRequest(b, **wants) for b in images])]  # type: ignore[misc]


def _embeds(stage: RetrievalImageStage, images: list[bytes]) -> np.ndarray:
    return np.stack([o.image_embeds for o in _outputs(stage, images)])  # type: ignore[misc]


def _text_embeds(stage: RetrievalTextStage, texts: list[str]) -> np.ndarray:
    return np.stack([_ok(r) for r in stage.run([TextRequest(t) for t in texts])])  # type: ignore[misc]


def test_tiny_itm_checkpoint_is_deterministic_and_laid_out_like_the_published_one(
    tmp_path: Path, tiny_itm_model_dir: Path
) -> None:
    again = write_tiny_itm_model(tmp_path / "again")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        assert (again / name).read_text() == (tiny_itm_model_dir / name).read_text(), name
    a, b = load_file(again / "model.safetensors"), load_file(tiny_itm_model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    config = Blip2Config.from_pretrained(again)
    processor = Blip2Processor.from_pretrained(again)
    assert config.architectures == ["Blip2ForImageTextRetrieval"]
    assert isinstance(processor.tokenizer, BertTokenizer) and processor.tokenizer.bos_token == "[DEC]"
    assert processor.num_query_tokens == config.num_query_tokens
    # As in the published checkpoints, the Q-Former embeds every tokenizer id but the processor's image token.
    assert config.qformer_config.vocab_size == config.image_token_id == len(processor.tokenizer) - 1
    assert config.num_query_tokens != 32 and config.image_text_hidden_size != 256  # no hard-coded published sizes
    assert json.loads((again / "TINY_MODEL.json").read_text())["family"] == "itm"


def test_embedded_default_serves_the_tiny_itm_checkpoint(tmp_path: Path) -> None:
    stage = RetrievalTextStage(ServerOptions(cache_dir=str(tmp_path)))
    assert Path(stage.loaded.source) == tmp_path / tiny_dirname("itm")
    assert ensure_tiny_model(tmp_path, "itm") == tmp_path / tiny_dirname("itm")
    assert [p.name for p in tmp_path.iterdir()] == [tiny_dirname("itm")]


def test_captioning_checkpoint_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="not an image-text retrieval checkpoint"):
        load_retrieval_stage("text", ServerOptions(model_id=str(tiny_model_dir)))


def test_each_stage_holds_only_its_own_weights(image_stage, text_stage, match_stage, itm_reference) -> None:
    def modules(stage) -> set[str]:
        return {k.split(".")[0] for k in stage.model.state_dict()}

    assert modules(image_stage) == {"vision_model", "query_tokens", "qformer", "vision_projection"}
    assert modules(text_stage) == {"embeddings", "qformer", "text_projection"}
    assert modules(match_stage) == {"query_tokens", "embeddings", "qformer", "itm_head"}
    # Q-Former modules a stage's path never runs are not loaded: the text FFN (image stage), the queries' FFN and
    # cross-attention (text stage).
    assert not any(".intermediate." in k for k in image_stage.model.state_dict())
    assert not any("crossattention" in k or "_query." in k for k in text_stage.model.state_dict())
    full = sum(p.numel() for p in itm_reference.model.parameters())
    for stage in (image_stage, text_stage, match_stage):
        assert stage.loaded.parameter_count == sum(p.numel() for p in stage.model.parameters()) < full


def test_shapes_come_from_the_checkpoint(image_stage, text_stage, hf_batched) -> None:
    assert image_stage.embeds_shape == tuple(hf_batched.image_embeds.shape[1:])
    assert text_stage.embeds_shape == tuple(hf_batched.text_embeds.shape[1:])
    assert image_stage.features_shape == tuple(hf_batched.vision_model_output.last_hidden_state.shape[1:])


def test_tiny_model_margins_keep_rankings_and_matches_above_float_noise(hf_batched, hf_match_single) -> None:
    # The equality tests below compare rankings and match decisions; with scores within ATOL of transformers', a
    # gap wider than 2 * ATOL between any two scores cannot swap them. 10x leaves room for noise on other CPUs.
    scores = hf_batched.logits_per_image.numpy()
    assert np.diff(np.sort(scores, axis=1), axis=1).min() > 10 * ATOL  # texts ranked for each image
    assert np.diff(np.sort(scores, axis=0), axis=0).min() > 10 * ATOL  # images ranked for each text
    probs = np.array(hf_match_single)
    assert np.abs(probs - 0.5).min() > 10 * ATOL
    # Probabilities that depend on the pair, not all saturated at one end.
    assert (probs > 0.5).any() and (probs < 0.5).any()
    assert ((probs > 0.05) & (probs < 0.95)).mean() > 0.25


def test_tokenization_matches_the_processor(text_stage, itm_reference) -> None:
    processor = itm_reference.processor
    queries = processor.num_query_tokens
    # Characters outside the vocabulary are [UNK] words, served like any other (transformers embeds them too).
    for text in (*TEXTS, "☃ 漢字", "  Mixed   CASE\twhitespace "):
        ids = text_stage.tokenize(TextRequest(text))
        assert ids == processor(text=text)["input_ids"][0]
        # With images the processor prepends the image tokens, which the model strips.
        with_image = processor(images=np.zeros((8, 8, 3), dtype=np.uint8), text=text)["input_ids"][0]
        assert with_image[queries:] == ids


def test_image_embeddings_and_features_equal_transformers(
    image_stage, hf_batched, hf_single, sample_images: dict[str, bytes], names: list[str]
) -> None:
    image_stage.cache.clear()
    image_stage.features_cache.clear()
    images = [sample_images[n] for n in names]
    batched = _outputs(image_stage, images, vision_features=True)
    single = [_outputs(image_stage, [b], vision_features=True)[0] for b in images]
    for got in (batched, single):
        embeds = np.stack([o.image_embeds for o in got])  # type: ignore[misc]
        features = np.stack([o.vision_features for o in got])  # type: ignore[misc]
        np.testing.assert_allclose(embeds, hf_batched.image_embeds.numpy(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(embeds, np.concatenate([h[0].image_embeds for h in hf_single]), rtol=0, atol=ATOL)
        np.testing.assert_allclose(features, hf_batched.vision_model_output.last_hidden_state.numpy(), rtol=0,
                                   atol=ATOL)
        np.testing.assert_allclose(np.linalg.norm(embeds, axis=-1), 1.0, rtol=0, atol=ATOL)


def test_text_embeddings_equal_transformers(text_stage, hf_batched, hf_single) -> None:
    batched = _text_embeds(text_stage, list(TEXTS))
    single = np.stack([_text_embeds(text_stage, [t])[0] for t in TEXTS])
    want_single = np.concatenate([h.text_embeds.numpy() for h in hf_single[0]])
    for got in (batched, single):
        np.testing.assert_allclose(got, hf_batched.text_embeds.numpy(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(got, want_single, rtol=0, atol=ATOL)
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=0, atol=ATOL)


def test_transformers_projection_models_agree(
    image_stage, text_stage, itm_reference, tiny_itm_model_dir: Path, sample_images: dict[str, bytes],
    names: list[str]
) -> None:
    # The standalone HF classes the issue names compute the same embeddings from the same checkpoint.
    processor = itm_reference.processor
    vision = Blip2VisionModelWithProjection.from_pretrained(tiny_itm_model_dir).eval()
    text = Blip2TextModelWithProjection.from_pretrained(tiny_itm_model_dir).eval()
    images = [sample_images[n] for n in names[:4]]
    with torch.inference_mode():
        pixels = itm_reference._inputs(images, ["x"] * len(images))["pixel_values"]
        hf_images = vision(pixel_values=pixels).image_embeds.numpy()
        hf_texts = text(**processor(text=list(TEXTS), return_tensors="pt", padding=True)).text_embeds[:, 0].numpy()
    np.testing.assert_allclose(_embeds(image_stage, images), hf_images, rtol=0, atol=ATOL)
    np.testing.assert_allclose(_text_embeds(text_stage, list(TEXTS)), hf_texts, rtol=0, atol=ATOL)


def _ranks(scores: np.ndarray, axis: int) -> np.ndarray:
    return np.argsort(-scores, axis=axis, kind="stable")


def test_similarity_equals_transformers_and_ranks_identically(
    image_stage, text_stage, hf_batched, hf_single, sample_images: dict[str, bytes], names: list[str]
) -> None:
    images = [sample_images[n] for n in names]
    image_embeds, text_embeds = _embeds(image_stage, images), _text_embeds(text_stage, list(TEXTS))
    similarity = SimilarityStage(image_stage.config)
    pairs = [SimilarityRequest(image_embeds[i], text_embeds[j]) for i in range(len(images)) for j in range(len(TEXTS))]
    served = np.array([_ok(r) for r in similarity.run(pairs)]).reshape(len(images), len(TEXTS))
    matrix = contrastive_similarity(image_embeds, text_embeds)
    want_single = np.array([[h.logits_per_image.item() for h in row] for row in hf_single])
    want = hf_batched.logits_per_image.numpy()
    for got in (served, matrix):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
        np.testing.assert_allclose(got, want_single, rtol=0, atol=ATOL)
        for axis in (0, 1):
            assert (_ranks(got, axis) == _ranks(want, axis)).all()
            assert (_ranks(got, axis) == _ranks(want_single, axis)).all()


def test_match_probabilities_equal_transformers(
    image_stage, match_stage, itm_reference, hf_match_single, pairs, sample_images: dict[str, bytes],
    names: list[str]
) -> None:
    images = [sample_images[n] for n in names]
    features = [o.vision_features for o in _outputs(image_stage, images, image_embeds=False, vision_features=True)]
    batched = [_ok(r) for r in match_stage.run([MatchRequest(features[i], t) for i, t in pairs])]
    single = [_ok(match_stage.run([MatchRequest(features[i], t)])[0]) for i, t in pairs]
    hf_batched = itm_reference.match([images[i] for i, _ in pairs], [t for _, t in pairs])
    for got in (batched, single):
        for want in (hf_batched, hf_match_single):
            np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
            assert [p > 0.5 for p in got] == [p > 0.5 for p in want]  # type: ignore[operator]


def test_bad_text_fails_alone_with_a_clear_message(text_stage, match_stage, image_stage,
                                                   sample_images: dict[str, bytes]) -> None:
    limit = text_stage.max_text_tokens
    assert limit == image_stage.config.qformer_config.max_position_embeddings  # from the checkpoint
    bad = {
        None: "text_input: required input is missing",
        "": "text_input: expected non-empty text, got an empty string",
        " \t\n": "text_input: expected non-empty text, got only whitespace",
        "a\x00b": "text_input: NUL characters are not allowed",
        "\x01\x02": "text_input: expected text, got nothing left after tokenization",
        "a <image> here": "text_input: must not contain the image token '<image>'",
        " ".join(["cat"] * limit): f"text_input: expected at most {limit} tokens, got {limit + 2}",
        "x" * (limit * 128 + 1): f"text_input: expected at most {limit * 128} bytes, got {limit * 128 + 1}",
    }
    good = ["a red car", " ".join(["cat"] * (limit - 2))]  # the longest accepted: [CLS] + words + [SEP]
    texts = [good[0], *bad, good[1]]
    alone = [_text_embeds(text_stage, [t])[0] for t in good]
    results = text_stage.run([TextRequest(t) for t in texts])
    assert [str(r) for r in results[1:-1]] == list(bad.values())
    assert all(isinstance(r, InvalidRequestError) for r in results[1:-1])
    np.testing.assert_allclose(np.stack([results[0], results[-1]]), np.stack(alone), rtol=0, atol=ATOL)
    # The matching stage refuses the same texts with the same messages.
    (features,) = [o.vision_features for o in _outputs(image_stage, [sample_images["bmp"]], vision_features=True)]
    matched = match_stage.run([MatchRequest(features, t) for t in texts])
    assert [str(r) for r in matched[1:-1]] == list(bad.values())
    assert isinstance(matched[0], float) and isinstance(matched[-1], float)


def test_bad_images_and_arrays_fail_alone(image_stage, match_stage, sample_images: dict[str, bytes]) -> None:
    good = sample_images["webp"]
    oversized = b"\0" * (image_stage.options.max_image_bytes + 1)
    results = image_stage.run([*(RetrievalImageRequest(d) for d in (good, b"junk", b"", oversized, good)),
                               RetrievalImageRequest(good, image_embeds=False)])
    assert str(results[5]) == "image: expected a request for image_embeds or _vision_features, got neither"
    assert "image: bytes are not a supported image file" in str(results[1])
    assert str(results[2]) == "image: expected encoded image bytes, got 0 bytes"
    assert "bytes, got" in str(results[3])
    assert isinstance(results[0], ImageOutputs) and isinstance(results[4], ImageOutputs)
    np.testing.assert_array_equal(results[0].image_embeds, _embeds(image_stage, [good])[0])

    shape = match_stage.features_shape
    nan = np.zeros(shape, np.float32)
    nan[0, 0] = np.nan
    (features,) = [o.vision_features for o in _outputs(image_stage, [good], vision_features=True)]
    matched = match_stage.run([MatchRequest(np.zeros((3, 3), np.float32), "a cat"), MatchRequest(nan, "a cat"),
                               MatchRequest(features, "a cat")])
    assert str(matched[0]) == f"_vision_features: expected shape {list(shape)}, got [3, 3]"
    assert str(matched[1]) == "_vision_features: expected finite values, got NaN or inf"
    assert matched[2] == pytest.approx(match_stage.run([MatchRequest(features, "a cat")])[0], abs=ATOL)

    similarity = SimilarityStage(match_stage.config)
    image, text = np.zeros(similarity.image_shape, np.float32), np.zeros(similarity.text_shape, np.float32)
    scored = similarity.run([SimilarityRequest(image[:1], text), SimilarityRequest(image, text[None]),
                             SimilarityRequest(image, text)])
    assert str(scored[0]) == f"_image_embeds: expected shape {list(similarity.image_shape)}, got [1, {image.shape[1]}]"
    assert str(scored[1]) == f"_text_embeds: expected shape {list(similarity.text_shape)}, got [1, {text.shape[0]}]"
    assert scored[2] == 0.0


class _Calls:
    """Rows through each model part, one list entry per forward call."""

    def __init__(self, stage: RetrievalImageStage) -> None:
        self.vit: list[int] = []
        self.qformer: list[int] = []
        self._hooks = [
            stage.model.vision_model.register_forward_pre_hook(
                lambda _m, _a, kw: self.vit.append(kw["pixel_values"].shape[0]), with_kwargs=True),
            stage.model.qformer.register_forward_pre_hook(
                lambda _m, _a, kw: self.qformer.append(kw["query_embeds"].shape[0]), with_kwargs=True),
        ]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


@pytest.fixture
def calls(image_stage: RetrievalImageStage) -> Iterator[_Calls]:
    image_stage.cache.clear()
    image_stage.features_cache.clear()
    counter = _Calls(image_stage)
    yield counter
    counter.close()


def test_cache_hit_costs_no_vision_compute(image_stage, calls: _Calls, sample_images: dict[str, bytes]) -> None:
    a = sample_images["rgb_jpeg"]
    (miss,) = _outputs(image_stage, [a])
    assert (calls.vit, calls.qformer) == ([1], [1])
    (hit,) = _outputs(image_stage, [a])
    (features,) = _outputs(image_stage, [a], image_embeds=False, vision_features=True)
    assert (calls.vit, calls.qformer) == ([1], [1])  # both answered from the caches
    assert hit.image_embeds.tobytes() == miss.image_embeds.tobytes()  # type: ignore[union-attr]
    assert features.image_embeds is None and features.vision_features is not None
    # Embeddings evicted, features still cached: only the Q-Former runs.
    image_stage.cache.clear()
    (again,) = _outputs(image_stage, [a])
    assert (calls.vit, calls.qformer) == ([1], [1, 1])
    assert again.image_embeds.tobytes() == miss.image_embeds.tobytes()  # type: ignore[union-attr]


def test_base64_image_shares_the_files_cache_entry(image_stage, calls: _Calls, sample_images: dict[str, bytes]) -> None:
    import base64

    data = sample_images["webp"]
    (raw,) = _outputs(image_stage, [data])
    (encoded,) = _outputs(image_stage, [b"data:image/webp;base64," + base64.b64encode(data)])
    assert (calls.vit, calls.qformer) == ([1], [1])
    assert encoded.image_embeds.tobytes() == raw.image_embeds.tobytes()  # type: ignore[union-attr]


def test_repeated_image_in_a_batch_is_computed_once(image_stage, calls: _Calls,
                                                    sample_images: dict[str, bytes]) -> None:
    a, b = sample_images["rgb_jpeg"], sample_images["rgba_png"]
    results = image_stage.run([RetrievalImageRequest(a), RetrievalImageRequest(b),
                               RetrievalImageRequest(a, image_embeds=False, vision_features=True),
                               RetrievalImageRequest(b"junk"), RetrievalImageRequest(a)])
    assert (calls.vit, calls.qformer) == ([2], [2])
    assert isinstance(results[3], InvalidRequestError)
    first, features, last = results[0], results[2], results[4]
    assert isinstance(first, ImageOutputs) and isinstance(features, ImageOutputs) and isinstance(last, ImageOutputs)
    assert first.image_embeds.tobytes() == last.image_embeds.tobytes()  # type: ignore[union-attr]
    assert features.image_embeds is None and features.vision_features is not None
    assert (image_stage.cache.stats().entries, image_stage.features_cache.stats().entries) == (2, 2)


def test_results_equal_with_and_without_caches(image_stage, options: ServerOptions,
                                               sample_images: dict[str, bytes], names: list[str]) -> None:
    uncached = RetrievalImageStage(replace(options, embedding_cache_bytes=0), loaded=image_stage.loaded)
    assert not uncached.cache.enabled and not uncached.features_cache.enabled
    images = [sample_images[n] for n in names[:4]]
    want = _outputs(uncached, images, vision_features=True)
    _outputs(image_stage, images, vision_features=True)  # fills the caches
    got = _outputs(image_stage, images, vision_features=True)
    for g, w in zip(got, want, strict=True):
        assert g.image_embeds.tobytes() == w.image_embeds.tobytes()  # type: ignore[union-attr]
        assert g.vision_features.tobytes() == w.vision_features.tobytes()  # type: ignore[union-attr]


def test_served_pipeline_gives_what_run_gives_and_cached_features_skip_the_vit(
    image_stage, options: ServerOptions, calls: _Calls, sample_images: dict[str, bytes], names: list[str]
) -> None:
    import threading

    from blip2_triton.vision.pipeline import VisionPipeline

    uncached = RetrievalImageStage(replace(options, embedding_cache_bytes=0), loaded=image_stage.loaded)
    images = [sample_images[n] for n in names[:4]]
    want = _outputs(uncached, images, vision_features=True)
    calls.vit.clear()
    calls.qformer.clear()
    pipeline = VisionPipeline(image_stage, decode_threads=2, max_batch=8)

    def served(requests: list[RetrievalImageRequest]) -> list[object]:
        done, got = threading.Event(), []
        pipeline.submit(requests, lambda rows: (got.extend(rows), done.set()))
        assert done.wait(60)
        return got

    try:
        rows = served([*(RetrievalImageRequest(b) for b in images), RetrievalImageRequest(b"junk")])
        image_stage.cache.clear()  # embeddings evicted, ViT features kept
        (again,) = served([RetrievalImageRequest(images[0])])
        vit_after_miss = sum(calls.vit)
        (features,) = served([RetrievalImageRequest(images[1], image_embeds=False, vision_features=True)])
    finally:
        pipeline.stop()
    assert "image: bytes are not a supported image file" in str(rows[-1])
    for got, w in zip(rows[:-1], want, strict=True):
        np.testing.assert_allclose(got.image_embeds, w.image_embeds, rtol=0, atol=ATOL)  # type: ignore[union-attr]
        assert got.vision_features is None  # type: ignore[union-attr]
    np.testing.assert_allclose(again.image_embeds, want[0].image_embeds, rtol=0, atol=ATOL)  # type: ignore[union-attr]
    np.testing.assert_allclose(features.vision_features, want[1].vision_features, rtol=0, atol=ATOL)  # type: ignore
    assert features.image_embeds is None  # type: ignore[union-attr]
    # The ViT ran once per image; the evicted embeddings and the cached features cost no ViT.
    assert vit_after_miss == sum(calls.vit) == len(images)
    assert sum(calls.qformer) == len(images) + 1
