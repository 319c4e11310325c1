"""Hostile and unusual inputs for the robustness tests (unit and integration), built deterministically.

`good_images()`: unusual but valid images the server must caption exactly like the HF reference.
`bad_images()`: (bytes, substring of the expected error message) per case.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from images import encode
from PIL import Image

MAX_IMAGE_PIXELS = 24_000_000
MAX_IMAGE_BYTES = 20 * 1024 * 1024


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * (255 / max(width - 1, 1)), y * (255 / max(height - 1, 1)),
                     np.full_like(x, 40 * (seed % 5), dtype=np.float64)], axis=-1)
    return np.clip(base + rng.normal(0, 30, size=(height, width, 3)), 0, 255).astype(np.uint8)


def _smooth(width: int, height: int) -> np.ndarray:
    # Built from uint8 ramps: a float pattern of 20 MP would take half a gigabyte to make.
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[..., 0] = (np.arange(width, dtype=np.uint32) * 255 // max(width - 1, 1)).astype(np.uint8)[None, :]
    out[..., 1] = (np.arange(height, dtype=np.uint32) * 255 // max(height - 1, 1)).astype(np.uint8)[:, None]
    out[..., 2] = 90
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_16bit_rgb(width: int, height: int, seed: int) -> bytes:
    # PIL cannot write 16-bit RGB PNGs; this is the plain format (filter byte 0 per row).
    pixels = _pattern(width, height, seed).astype(">u2") * 257
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG header that declares `width` x `height` (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    # Only the first rows are real: the point is the declared size, checked before any decoding.
    data = zlib.compress(row * 4)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0/SOF2) is patched to declare another size."""
    out = bytearray(data)
    i = 2
    while i < len(out) - 9:
        if out[i] == 0xFF and out[i + 1] in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", out, i + 5, height, width)
            return bytes(out)
        length = struct.unpack(">H", out[i + 2:i + 4])[0]
        i += 2 + length
    raise ValueError("no SOF marker")


def exif_rotated_jpeg() -> bytes:
    img = Image.fromarray(_pattern(160, 100, 21))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return encode(img, "JPEG", quality=90, exif=exif)


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(_pattern(120, 90, 30 + i)) for i in range(3)]
    if fmt == "GIF":
        frames = [f.convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_with_transparency() -> bytes:
    img = Image.fromarray(_pattern(100, 80, 41)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return encode(img, "PNG", transparency=3)


def good_images() -> dict[str, bytes]:
    return {
        "exif_rotated_jpeg": exif_rotated_jpeg(),
        "animated_gif": animated("GIF"),
        "animated_webp": animated("WEBP"),
        "png_16bit_rgb": png_16bit_rgb(64, 48, 51),
        "cmyk_jpeg": encode(Image.fromarray(_pattern(90, 60, 52)).convert("CMYK"), "JPEG", quality=90),
        "palette_transparency_png": palette_with_transparency(),
        "la_png": encode(Image.fromarray(_pattern(70, 50, 53)).convert("LA"), "PNG"),
        "progressive_jpeg": encode(Image.fromarray(_pattern(200, 150, 54)), "JPEG", quality=85, progressive=True),
        "one_pixel_gif": encode(Image.new("P", (1, 1)), "GIF"),
        "wide_2000x3": encode(Image.fromarray(_pattern(2000, 3, 55)), "PNG"),
        "tall_3x2000": encode(Image.fromarray(_pattern(3, 2000, 56)), "PNG"),
        # One scan, and a comment full of FF DA bytes (metadata, not scans).
        "jpeg_comment_with_sos_bytes": jpeg_with_comment(
            encode(Image.fromarray(_pattern(80, 60, 57)), "JPEG", quality=90), b"\xff\xda" * 32000),
        # Large but legal: 20 MP (under the 24 MP default); smooth so the file stays small.
        "large_20mp_jpeg": encode(Image.fromarray(_smooth(5000, 4000)), "JPEG", quality=80),
    }


def jpeg_with_comment(jpeg: bytes, comment: bytes) -> bytes:
    """`jpeg` with COM segments holding `comment` right after SOI."""
    segments = b"".join(b"\xff\xfe" + (len(part) + 2).to_bytes(2, "big") + part
                        for part in (comment[i:i + 65000] for i in range(0, len(comment), 65000)))
    return jpeg[:2] + segments + jpeg[2:]


def scan_flood_jpeg(extra_scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated `extra_scans` times: real SOS segments inside the image."""
    data = encode(Image.fromarray(_pattern(64, 48, 63)), "JPEG", quality=90, progressive=True)
    last = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * extra_scans + data[end:]


def bad_images() -> dict[str, tuple[bytes, str]]:
    jpeg = encode(Image.fromarray(_pattern(120, 90, 61)), "JPEG", quality=90)
    png = encode(Image.fromarray(_pattern(120, 90, 62)), "PNG")
    corrupt_png = bytearray(png)
    idat = corrupt_png.index(b"IDAT") + 4
    for k in range(idat + 20, min(idat + 400, len(corrupt_png) - 16), 7):
        corrupt_png[k] ^= 0x5A
    gif = bytearray(encode(Image.new("P", (10, 10)), "GIF"))
    struct.pack_into("<HH", gif, 6, 65000, 65000)  # logical screen size
    too_many_scans = scan_flood_jpeg(600)
    return {
        "empty": (b"", "got 0 bytes"),
        "random_bytes": (np.random.default_rng(7).bytes(3000), "not a supported image file"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "corrupt or truncated"),
        "truncated_png": (png[: len(png) // 2], "corrupt or truncated"),
        "png_corrupt_body": (bytes(corrupt_png), "corrupt or truncated"),
        "png_header_only": (png[:33], "not a supported image file"),
        "bomb_png_48mp": (png_declaring(8000, 6000), f"expected at most {MAX_IMAGE_PIXELS} pixels, got 8000x6000"),
        "bomb_png_400mp": (png_declaring(20000, 20000), f"expected at most {MAX_IMAGE_PIXELS} pixels"),
        "bomb_jpeg_sof": (jpeg_with_size(jpeg, 65000, 65000), f"expected at most {MAX_IMAGE_PIXELS} pixels"),
        "bomb_gif_screen": (bytes(gif), f"expected at most {MAX_IMAGE_PIXELS} pixels"),
        "jpeg_scan_flood": (too_many_scans, "JPEG scans"),
        "pdf": (b"%PDF-1.4\n1 0 obj<< /Type /Catalog >>endobj\ntrailer<<>>\n%%EOF", "not a supported image file"),
        "svg": (b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>", "not a supported image file"),
        "text": (b"hello, this is not an image\n", "not a supported image file"),
        "ico": (encode(Image.new("RGB", (16, 16)), "ICO"), "got ICO"),
        "ppm": (encode(Image.new("RGB", (16, 16)), "PPM"), "got PPM"),
    }


def oversized_image() -> tuple[bytes, str]:
    return b"\xff\xd8" + b"\x00" * MAX_IMAGE_BYTES, f"expected at most {MAX_IMAGE_BYTES} bytes"
