"""Deterministic synthetic image set for load tests: varied sizes, aspect ratios, modes and formats."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

# Bump when the specs or the drawing change so stale caches are regenerated rather than silently reused.
IMAGE_SET_VERSION = 1

# (name, width, height, PIL mode, format, save options). Sizes span thumbnails to phone-camera-ish frames so
# decode and resize cost varies per request the way real traffic does; modes cover the RGB conversions a
# server must do (greyscale, alpha, palette).
SPECS: list[tuple[str, int, int, str, str, dict]] = [
    ("thumb_64x64.png", 64, 64, "RGB", "PNG", {}),
    ("small_160x120.jpg", 160, 120, "RGB", "JPEG", {"quality": 85}),
    ("square_224x224.jpg", 224, 224, "RGB", "JPEG", {"quality": 90}),
    ("qvga_320x240.png", 320, 240, "RGB", "PNG", {}),
    ("square_384x384.webp", 384, 384, "RGB", "WEBP", {"quality": 80}),
    ("portrait_300x500.jpg", 300, 500, "RGB", "JPEG", {"quality": 85}),
    ("grey_480x360.jpg", 480, 360, "L", "JPEG", {"quality": 85}),
    ("alpha_256x256.png", 256, 256, "RGBA", "PNG", {}),
    ("palette_200x150.gif", 200, 150, "P", "GIF", {}),
    ("bitmap_200x150.bmp", 200, 150, "RGB", "BMP", {}),
    ("vga_640x480.jpg", 640, 480, "RGB", "JPEG", {"quality": 85}),
    ("wide_800x450.webp", 800, 450, "RGB", "WEBP", {"quality": 80}),
    ("svga_800x600.jpg", 800, 600, "RGB", "JPEG", {"quality": 90}),
    ("xga_1024x768.jpg", 1024, 768, "RGB", "JPEG", {"quality": 85}),
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "blip2-loadtest" / f"images-v{IMAGE_SET_VERSION}"


def draw_image(width: int, height: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    # Two-colour gradient background: cheap, smooth, and compresses like a photo sky or wall.
    top = tuple(rng.randrange(256) for _ in range(3))
    bottom = tuple(rng.randrange(256) for _ in range(3))
    gradient = Image.linear_gradient("L").resize((width, height))
    image.paste(Image.composite(Image.new("RGB", image.size, bottom), Image.new("RGB", image.size, top), gradient))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(4, 10)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = min(width, x0 + rng.randint(width // 10 + 1, width // 2 + 2))
        y1 = min(height, y0 + rng.randint(height // 10 + 1, height // 2 + 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = rng.choice(("ellipse", "rectangle", "line"))
        if shape == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=max(1, min(width, height) // 40))
    image = image.filter(ImageFilter.GaussianBlur(radius=max(1, min(width, height) // 200)))
    # Seeded sensor-like grain: without it JPEG/WebP files are several times smaller than photos of the same size,
    # which would understate upload and decode cost.
    grain = Image.frombytes("L", (width, height), rng.randbytes(width * height)).convert("RGB")
    return Image.blend(image, grain, 0.12)


def _convert(image: Image.Image, mode: str) -> Image.Image:
    if mode == "RGBA":
        rgba = image.convert("RGBA")
        alpha = Image.linear_gradient("L").resize(image.size).point(lambda v: 128 + v // 2)
        rgba.putalpha(alpha)
        return rgba
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return image.convert(mode)


def generate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (name, width, height, mode, fmt, options) in enumerate(SPECS):
        path = out_dir / name
        _convert(draw_image(width, height, seed=1000 + index), mode).save(path, format=fmt, **options)
        paths.append(path)
    return paths


def ensure_images(cache_dir: Path | None = None) -> Path:
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    manifest = cache_dir / "manifest.json"
    expected = {"version": IMAGE_SET_VERSION, "files": [spec[0] for spec in SPECS]}
    try:
        if json.loads(manifest.read_text()) == expected and all((cache_dir / f).is_file() for f in expected["files"]):
            return cache_dir
    except (OSError, ValueError):
        pass
    # Build next to the target and rename so concurrent Locust processes never read a half-written set.
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".images-", dir=cache_dir.parent))
    try:
        generate(staging)
        (staging / "manifest.json").write_text(json.dumps(expected))
        if cache_dir.exists():
            shutil.rmtree(cache_dir, ignore_errors=True)
        try:
            staging.rename(cache_dir)
        except OSError:
            # Another process won the race; its set is identical.
            if not manifest.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache_dir


def load_images(image_dir: Path | None = None) -> list[tuple[str, bytes]]:
    directory = Path(image_dir) if image_dir else ensure_images()
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {directory}")
    return [(p.name, p.read_bytes()) for p in files]


def make_unique(data: bytes, tag: bytes) -> bytes:
    """Same pixels, different bytes: defeats server-side caches keyed on the encoded image (the vision stage's
    embedding cache), so a capacity test measures the vision compute unless repeats are wanted."""
    if len(tag) > 255:
        raise ValueError("tag must be at most 255 bytes")
    if data[:2] == b"\xff\xd8":  # JPEG: a comment (COM) segment right after SOI
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(tag) + 2) + tag + data[2:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # PNG: an ancillary tEXt chunk after IHDR
        body = b"tEXt" + b"nonce\x00" + tag
        chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
        ihdr_end = 8 + 12 + struct.unpack(">I", data[8:12])[0]
        return data[:ihdr_end] + chunk + data[ihdr_end:]
    if data[:6] == b"GIF89a" and data.endswith(b";"):  # GIF: a comment extension before the trailer
        return data[:-1] + b"\x21\xfe" + bytes([len(tag)]) + tag + b"\x00;"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":  # WebP: an unknown chunk at the end, RIFF size updated
        body = data[8:] + b"NONC" + struct.pack("<I", len(tag)) + tag + b"\x00" * (len(tag) % 2)
        return b"RIFF" + struct.pack("<I", len(body)) + body
    # BMP, TIFF and most other formats locate their data by offsets, so trailing bytes are ignored.
    return data + tag


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the default load-test image set.")
    parser.add_argument("--out", type=Path, default=None, help=f"directory (default {default_cache_dir()})")
    args = parser.parse_args(argv)
    directory = ensure_images(args.out)
    for name, data in load_images(directory):
        print(f"{len(data):>9} B  {directory / name}")


if __name__ == "__main__":
    main()
