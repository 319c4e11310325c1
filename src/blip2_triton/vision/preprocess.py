"""The checkpoint's image processor, with its resize done on the decoded PIL image where that gives the same pixels.

HF's PIL-backed processors turn the image into a channels-first array, back into a PIL image, resize that and then
rescale and normalise. For a 12 MP photo the two full-size copies cost more than the resize itself. Resizing the RGB
image once, then running the processor with `do_resize=False`, feeds the same uint8 pixels to the same rescale and
normalise code, so the pixel values are bit-identical; a probe at load time checks that, and any processor this path
does not cover (other backends, aspect-preserving sizes, centre crops) runs unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

# Odd sizes, both orientations, and larger than any target so the probe resizes in both directions.
_PROBE_SIZES = ((97, 61), (61, 97), (640, 480))


def _target(processor: Any) -> tuple[int, int] | None:
    """(width, height) of a fixed-size PIL resize, or None where the processor is not of that kind."""
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # an older transformers layout: keep the processor as it is
        return None
    if not isinstance(processor, PilBackend) or not getattr(processor, "do_resize", False):
        return None
    if getattr(processor, "do_center_crop", False) or getattr(processor, "do_pad", False):
        return None
    size = processor.size
    height, width = getattr(size, "height", None), getattr(size, "width", None)
    if not height or not width or getattr(size, "shortest_edge", None) or getattr(size, "longest_edge", None):
        return None
    resample = getattr(processor, "resample", None)
    if not isinstance(resample, int):  # PILImageResampling is an IntEnum; torchvision modes are not
        return None
    return int(width), int(height)


def _probe(size: tuple[int, int]) -> Image.Image:
    width, height = size
    rng = np.random.default_rng(width * 1000 + height)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


class ImagePreprocessor:
    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.target = _target(processor)
        if self.target is not None and not all(
            torch.equal(self._direct(image), self._reference(image)) for image in map(_probe, _PROBE_SIZES)
        ):
            log.warning("image preprocessing: resizing before the processor changes its pixel values here; "
                        "using the processor's own path")
            self.target = None

    @property
    def direct(self) -> bool:
        """Whether images are resized before the processor (bit-identical, probed at load)."""
        return self.target is not None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Pixel values [3, H, W] exactly as `processor([image])` gives them."""
        # A transparent colour (a palette PNG's tRNS, kept by `convert("RGB")`) is composited onto white by HF's
        # RGB step before it resizes; only images the RGB step leaves alone are resized first.
        if self.target is None or image.mode != "RGB" or image.info.get("transparency") is not None:
            return self._reference(image)
        return self._direct(image)

    def _reference(self, image: Image.Image) -> torch.Tensor:
        return self.processor([image], return_tensors="pt")["pixel_values"][0]

    def _direct(self, image: Image.Image) -> torch.Tensor:
        assert self.target is not None
        resized = image.resize(self.target, resample=self.processor.resample)
        return self.processor([resized], do_resize=False, return_tensors="pt")["pixel_values"][0]
