"""Both stages in-process (no Triton) against the HF reference."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from images import PROMPTS
from PIL import Image
from robustness_corpus import png_declaring

from blip2_triton.errors import InvalidRequestError
from blip2_triton.llm import LanguageStage
from blip2_triton.llm.batch import BatchState
from blip2_triton.options import ServerOptions
from blip2_triton.requests import GenerationRequest, ImageRequest
from blip2_triton.vision import VisionStage, decode_image


@pytest.fixture(scope="module")
def stages(tiny_model_dir: Path) -> tuple[VisionStage, LanguageStage]:
    options = ServerOptions(model_id=str(tiny_model_dir))
    return VisionStage(options), LanguageStage(options)


def _embed(stages, data: bytes) -> np.ndarray:
    (emb,) = stages[0].run([ImageRequest(data)])
    assert not isinstance(emb, Exception)
    return emb


def test_shapes_come_from_the_checkpoint(stages, hf_reference) -> None:
    config = hf_reference.model.config
    assert stages[0].output_shape == (config.num_query_tokens, config.text_config.hidden_size)
    assert stages[1].embeds_shape == stages[0].output_shape
    assert config.num_query_tokens != 32  # the tiny model must not hide hard-coded published sizes


def test_batched_generation_matches_hf(stages, sample_images, reference) -> None:
    names = sorted(sample_images)
    embeds = stages[0].run([ImageRequest(sample_images[n]) for n in names])
    requests, expected = [], []
    for i, (name, emb) in enumerate(zip(names, embeds, strict=True)):
        for prompt in PROMPTS:
            n = 4 + i % 9
            requests.append(GenerationRequest(query_embeds=emb, prompt=prompt, max_tokens=n))
            expected.append(reference(sample_images[name], prompt, n))
    assert stages[1].run(requests) == expected
    assert len(set(expected)) > len(expected) // 2, "tiny model outputs should depend on image and prompt"


def test_rows_stay_padded_after_the_longest_prompt_retires(stages, sample_images, reference) -> None:
    # The longest prompt finishes after one token; the two short ones left have equal lengths but still sit
    # behind its padding columns, so every later step must keep masking them.
    emb = _embed(stages, sample_images["webp"])
    long_prompt = PROMPTS[1] + " and what else is there to see in it, in a few words?"
    cases = [(long_prompt, 1), (PROMPTS[0], 8), (PROMPTS[0], 8)]
    results = stages[1].run([GenerationRequest(query_embeds=emb, prompt=p, max_tokens=n) for p, n in cases])
    assert results == [reference(sample_images["webp"], p, n) for p, n in cases]


def test_seeded_sample_is_independent_of_its_batch(stages, sample_images) -> None:
    emb = _embed(stages, sample_images["webp"])

    def sampled() -> GenerationRequest:
        return GenerationRequest(query_embeds=emb, max_tokens=12, temperature=20.0, seed=42)

    alone = stages[1].run([sampled()])[0]
    batched = stages[1].run([
        GenerationRequest(query_embeds=emb, max_tokens=2),
        sampled(),
        GenerationRequest(query_embeds=emb, max_tokens=20, temperature=0.7, top_p=0.5, seed=1),
    ])[1]
    assert alone == batched
    # The tiny model's logits are sharp; a high temperature makes samples actually depend on the seed.
    hot = [GenerationRequest(query_embeds=emb, max_tokens=12, temperature=20.0, seed=s) for s in (1, 2, 3)]
    assert len(set(stages[1].run(hot))) > 1


def test_greedy_margins_are_clear(hf_reference, sample_images) -> None:
    # The tiny model is built so float noise between batched and single execution cannot flip a greedy pick.
    gaps = []
    for data in sample_images.values():
        img = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = hf_reference.processor(images=img, return_tensors="pt")
        out = hf_reference.model.generate(**inputs, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
        for scores in out.scores:
            top = torch.topk(scores[0], 2).values
            gaps.append(float(top[0] - top[1]))
    # Batched-vs-single float32 noise on these logits is ~1e-4; a random init without the scale gives ~1e-4 gaps.
    assert min(gaps) > 1e-3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "got 0 bytes"),
        (b"%PDF-1.4\n1 0 obj<<>>endobj", "not a supported image file"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not a supported image file"),
        ("truncated_png", "corrupt or truncated"),
        ("bomb", "expected at most 24000000 pixels, got 8000x6000"),
        ("huge_bomb", "expected at most 24000000 pixels, got a larger image"),
        ("ico", "expected JPEG, PNG, WebP, BMP, GIF or TIFF, got ICO"),
    ],
)
def test_bad_images_are_invalid_requests(data, message, sample_images) -> None:
    if data == "truncated_png":
        data = sample_images["rgb_png_portrait"][:3000]
    elif data in ("bomb", "huge_bomb"):
        # A few KB of PNG declaring tens or hundreds of megapixels.
        buf = io.BytesIO()
        Image.new("1", (8000, 6000) if data == "bomb" else (20000, 20000)).save(buf, "PNG")
        data = buf.getvalue()
        assert len(data) < 200_000
    elif data == "ico":
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, "ICO")
        data = buf.getvalue()
    with pytest.raises(InvalidRequestError) as e:
        decode_image(ImageRequest(data), ServerOptions())
    assert message in str(e.value)


def test_raised_pixel_limit_is_the_one_applied(monkeypatch) -> None:
    # Just over twice PIL's default limit, where PIL itself refused before the configured limit was checked.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    data = png_declaring(13400, 13400)
    with pytest.raises(InvalidRequestError) as e:
        decode_image(ImageRequest(data), ServerOptions(max_image_pixels=100_000_000))
    # PIL's own check used to refuse this header first, claiming "a larger image" than the raised limit.
    assert "expected at most 100000000 pixels, got 13400x13400" in str(e.value)


def test_bad_image_fails_only_its_row(stages, sample_images) -> None:
    requests = [ImageRequest(sample_images["bmp"]), ImageRequest(b"junk"), ImageRequest(sample_images["tiff"])]
    out = stages[0].run(requests)
    assert isinstance(out[1], InvalidRequestError)
    assert out[0].shape == out[2].shape == stages[0].output_shape


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens: expected 1..256, got 0"),
        ({"max_tokens": 257}, "max_tokens: expected 1..256, got 257"),
        ({"temperature": float("inf")}, "temperature: expected a finite value >= 0"),
        ({"temperature": -1.0}, "temperature: expected a finite value >= 0"),
        ({"top_p": 0.0}, "top_p: expected 0 < top_p <= 1"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k: expected >= 0"),
        ({"beam_width": 0}, "beam_width: expected 1..8, got 0"),
        ({"beam_width": 3, "temperature": 0.8}, "cannot be combined with sampling"),
        ({"repetition_penalty": 0.0}, "repetition_penalty: expected a finite value > 0"),
        ({"prompt": "Question: <image> Answer:"}, "must not contain the image token"),
        ({"prompt": "word " * 300}, "text_input: expected at most 256 tokens"),
        ({"prompt": "a\x00b"}, "NUL characters"),
    ],
)
def test_invalid_generation_requests(stages, sample_images, kwargs, message) -> None:
    emb = _embed(stages, sample_images["bmp"])
    good = GenerationRequest(query_embeds=emb, max_tokens=3)
    out = stages[1].run([GenerationRequest(query_embeds=emb, **kwargs), good])
    assert isinstance(out[0], InvalidRequestError)
    assert message in str(out[0])
    assert isinstance(out[1], str)


def test_wrong_embedding_shape_is_rejected(stages) -> None:
    out = stages[1].run([GenerationRequest(query_embeds=np.zeros((32, 2560), dtype=np.float32))])
    assert isinstance(out[0], InvalidRequestError)
    assert "expected shape [8, 64], got [32, 2560]" in str(out[0])


def test_temperature_zero_is_greedy(stages, sample_images, reference) -> None:
    data = sample_images["tiff"]
    out = stages[1].run([GenerationRequest(query_embeds=_embed(stages, data), max_tokens=6, temperature=0.0)])
    assert out == [reference(data, None, 6)]


def test_decode_and_prefill_equals_a_step_then_a_prefill(stages, sample_images) -> None:
    # The in-flight engine's shared output projection must give what the two separate forwards give, to the
    # rounding that the product's row count changes anyway (as it does whenever the running batch changes).
    language = stages[1]
    runner = language.runner
    assert runner.shares_output_projection
    names = sorted(sample_images)
    embeds = stages[0].run([ImageRequest(sample_images[n]) for n in names])
    running = [language.prepare(GenerationRequest(query_embeds=e, prompt=PROMPTS[i % 2], max_tokens=8))
               for i, e in enumerate(embeds[:3])]
    # Prompts of different lengths, so the newcomers' prefill is left-padded too.
    newcomers = [language.prepare(GenerationRequest(query_embeds=e, prompt=prompt, max_tokens=8))
                 for e, prompt in zip(embeds[3:5], (PROMPTS[1], None), strict=True)]

    def running_batch() -> BatchState:
        prefilled = runner.prefill(running)
        for seq, token in zip(running, prefilled.logits.argmax(-1).tolist(), strict=True):
            seq.generated, seq.next_token = [token], token
        batch = BatchState()
        batch.merge(running, prefilled)
        batch.begin_step()
        return batch

    batch = running_batch()
    step_logits = runner.decode(batch)
    alone = runner.prefill(newcomers)

    batch2 = running_batch()
    shared_step, shared = runner.decode_and_prefill(batch2, newcomers)
    assert torch.equal(shared.mask, alone.mask)
    for together, apart in ((shared_step, step_logits), (shared.logits, alone.logits)):
        torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-4)
        assert torch.equal(together.argmax(-1), apart.argmax(-1))
    for before, after in zip(list(batch.cache.layers) + list(alone.cache.layers),
                             list(batch2.cache.layers) + list(shared.cache.layers), strict=True):
        assert torch.equal(before.keys, after.keys) and torch.equal(before.values, after.values)
