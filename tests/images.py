"""Deterministic test images covering the modes and formats the acceptance list names."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import strategies as st
from PIL import Image


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    # Gradients plus noise: structure that survives resizing, different for every seed.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            (x * (255 / max(width - 1, 1))),
            (y * (255 / max(height - 1, 1))),
            ((x + y) * (127 / max(width + height - 2, 1)) + 64 * (seed % 3)),
        ],
        axis=-1,
    )
    noise = rng.normal(0, 40, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    """The image's file bytes in `fmt` (PNG, JPEG, ...)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def sample_images() -> dict[str, bytes]:
    rgb = Image.fromarray(_pattern(320, 240, 1))
    images = {
        "rgb_jpeg": encode(rgb, "JPEG", quality=90),
        "rgb_png_portrait": encode(Image.fromarray(_pattern(120, 260, 2)), "PNG"),
        "rgba_png": encode(Image.fromarray(_pattern(200, 200, 3)).convert("RGBA"), "PNG"),
        "gray_l_png": encode(Image.fromarray(_pattern(150, 100, 4)).convert("L"), "PNG"),
        "palette_gif": encode(Image.fromarray(_pattern(160, 120, 5)).convert("P", palette=Image.Palette.ADAPTIVE),
                               "GIF"),
        "cmyk_jpeg": encode(Image.fromarray(_pattern(180, 140, 6)).convert("CMYK"), "JPEG", quality=92),
        "png_16bit": encode(Image.fromarray(_pattern(90, 70, 7)[..., 0].astype(np.uint16) * 257), "PNG"),
        "tiny_1x1": encode(Image.new("RGB", (1, 1), (200, 30, 90)), "PNG"),
        "tiny_3x5": encode(Image.fromarray(_pattern(3, 5, 8)), "PNG"),
        "large_jpeg": encode(Image.fromarray(_pattern(1600, 1200, 9)), "JPEG", quality=85),
        "webp": encode(Image.fromarray(_pattern(256, 192, 10)), "WEBP", quality=90),
        "bmp": encode(Image.fromarray(_pattern(64, 64, 11)), "BMP"),
        "tiff": encode(Image.fromarray(_pattern(100, 80, 12)), "TIFF"),
        "wide_png": encode(Image.fromarray(_pattern(600, 40, 13)), "PNG"),
    }
    return images


PROMPTS: tuple[str | None, ...] = (None, "Question: what color is the car? Answer:")


def mutated_images(samples: dict[str, bytes], *, edits: tuple[int, int], limits: tuple[int, int]
                   ) -> st.SearchStrategy[bytes]:
    """Real images with random byte edits, biased towards the first `limits` bytes (headers are where decoders
    branch), and sometimes truncated."""

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        data = bytearray(samples[draw(st.sampled_from(sorted(samples)))])
        for _ in range(draw(st.integers(*edits))):
            limit = draw(st.sampled_from([*limits, len(data)]))
            data[draw(st.integers(0, min(limit, len(data)) - 1))] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
        return bytes(data)

    return mutated()
