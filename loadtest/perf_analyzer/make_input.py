"""perf_analyzer `--input-data` JSON for the `blip2` ensemble: one entry per image, alternating caption and VQA.

    python loadtest/perf_analyzer/make_input.py > loadtest/perf_analyzer/blip2_input.json       # the shipped file
    python loadtest/perf_analyzer/make_input.py --image-dir ~/photos --max-tokens 30 > my_input.json

BYTES tensors go as base64 of Triton's wire format (a little-endian uint32 length, then the bytes); optional inputs
left out of an entry are not sent (perf_analyzer skips missing optional inputs), so caption entries carry no
`text_input`. See docs/LOADTEST.md for the perf_analyzer command line.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

QUESTIONS = ("What is in the picture?", "What color is it?", "How many objects are there?")
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def generated_images(count: int) -> list[bytes]:
    # Smooth gradients: small files (the shipped JSON stays small), different pixels per image.
    images = []
    for i in range(count):
        width, height = 96 + 32 * i, 64 + 32 * i
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 60 * i)], axis=-1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
        images.append(buf.getvalue())
    return images


def bytes_element(data: bytes) -> dict[str, Any]:
    return {"content": {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode()}, "shape": [1]}


def entries(images: list[bytes], max_tokens: int) -> list[dict[str, Any]]:
    data = []
    for i, image in enumerate(images):
        entry: dict[str, Any] = {"image": bytes_element(image), "max_tokens": [max_tokens]}
        if i % 2:
            entry["text_input"] = [f"Question: {QUESTIONS[i // 2 % len(QUESTIONS)]} Answer:"]
        data.append(entry)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-dir", type=Path, help="use these images (default: 4 generated JPEGs)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.image_dir:
        images = [p.read_bytes() for p in sorted(args.image_dir.iterdir()) if p.suffix.lower() in SUFFIXES]
    else:
        images = generated_images(4)
    json.dump({"data": entries(images, args.max_tokens)}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
