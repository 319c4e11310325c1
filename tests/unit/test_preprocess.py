"""Image preprocessing: resizing the decoded image first gives the processor's exact pixel values, or is not used."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from images import encode
from PIL import Image
from transformers import BlipImageProcessorPil
from transformers.image_processing_backends import PilBackend, TorchvisionBackend

from blip2_triton.options import ServerOptions
from blip2_triton.requests import ImageRequest
from blip2_triton.tiny import clip_image_processor
from blip2_triton.vision import decode_image
from blip2_triton.vision.preprocess import ImagePreprocessor


def _pil(size: int) -> BlipImageProcessorPil:
    # clip_image_processor gives the torchvision backend where torchvision is installed; resizing first is the PIL
    # backend's path.
    return BlipImageProcessorPil.from_dict(clip_image_processor(size).to_dict())


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    # Smooth gradients plus noise, saved as JPEG and decoded like a request: what the served path sees.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = np.random.default_rng(seed).integers(-12, 12, size=base.shape)
    data = encode(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)), "JPEG", quality=90)
    return decode_image(ImageRequest(data), ServerOptions())


@pytest.mark.parametrize("target", [48, 224])
@pytest.mark.parametrize("size", [(1600, 1200), (1200, 1600), (224, 224), (37, 300), (5, 3)])
def test_direct_resize_gives_the_processors_exact_pixels(target: int, size: tuple[int, int]) -> None:
    processor = _pil(target)
    pre = ImagePreprocessor(processor)
    assert pre.direct
    image = _photo(*size)
    expected = processor([image], return_tensors="pt")["pixel_values"][0]
    got = pre(image)
    assert got.dtype == expected.dtype and got.shape == (3, target, target)
    assert torch.equal(got, expected)


def test_direct_resize_skips_the_full_size_copies() -> None:
    processor = _pil(224)
    pre = ImagePreprocessor(processor)
    seen: list[tuple[int, ...]] = []
    original = PilBackend.process_image

    def spy(self, image, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(self, image, *args, **kwargs)
        seen.append(tuple(out.shape))
        return out

    PilBackend.process_image = spy  # type: ignore[method-assign]
    try:
        pre(_photo(1600, 1200))
    finally:
        PilBackend.process_image = original  # type: ignore[method-assign]
    # The processor only ever holds the 224 px image as an array, never the 1600x1200 one.
    assert seen == [(3, 224, 224)]


def test_aspect_preserving_sizes_keep_the_processors_own_path() -> None:
    processor = _pil(48)
    processor.size = type(processor.size)(shortest_edge=48)
    pre = ImagePreprocessor(processor)
    assert not pre.direct
    image = _photo(90, 60)
    assert torch.equal(pre(image), processor([image], return_tensors="pt")["pixel_values"][0])


def test_a_processor_whose_resize_differs_fails_the_probe_and_runs_unchanged() -> None:
    class Sharpening(BlipImageProcessorPil):
        def resize(self, image, size, resample=None, **kwargs):  # type: ignore[no-untyped-def]
            return np.clip(super().resize(image, size, resample=resample, **kwargs).astype(np.int16) + 1, 0, 255
                           ).astype(np.uint8)

    reference = _pil(48)
    processor = Sharpening(size={"height": 48, "width": 48}, image_mean=reference.image_mean,
                           image_std=reference.image_std)
    pre = ImagePreprocessor(processor)
    assert not pre.direct
    image = _photo(200, 100)
    assert torch.equal(pre(image), processor([image], return_tensors="pt")["pixel_values"][0])


def test_a_transparent_palette_colour_is_composited_as_hf_does_before_any_resize() -> None:
    from robustness_corpus import palette_with_transparency

    processor = _pil(64)
    image = decode_image(ImageRequest(palette_with_transparency()), ServerOptions())
    assert image.mode == "RGB" and image.info.get("transparency") is not None
    assert torch.equal(ImagePreprocessor(processor)(image), processor([image], return_tensors="pt")["pixel_values"][0])


def test_the_torchvision_backend_keeps_its_own_path() -> None:
    pytest.importorskip("torchvision")  # as on the GPU machine: transformers then picks this backend by default
    processor = clip_image_processor(48)
    assert isinstance(processor, TorchvisionBackend)
    pre = ImagePreprocessor(processor)
    assert not pre.direct
    image = _photo(200, 100)
    assert torch.equal(pre(image), processor([image], return_tensors="pt")["pixel_values"][0])
