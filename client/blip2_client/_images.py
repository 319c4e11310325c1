from __future__ import annotations

import io
import os
from typing import IO, Any, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image

ImageInput: TypeAlias = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | Image.Image | npt.NDArray[Any]
)

# Modes PNG stores as-is; anything else (CMYK, YCbCr, F, ...) goes through RGB.
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def _png(img: Image.Image) -> bytes:
    if img.mode not in _PNG_MODES:
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _array_to_png(arr: npt.NDArray[Any]) -> bytes:
    if arr.dtype != np.uint8:
        raise TypeError(f"numpy images must be uint8, got {arr.dtype}; convert with arr.astype(np.uint8)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"numpy images must be HxW or HxWxC with C in (1, 3, 4), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"numpy image is empty: shape {arr.shape}")
    return _png(Image.fromarray(np.ascontiguousarray(arr)))


def encode_image(image: ImageInput) -> bytes:
    """Return the encoded image file bytes the server expects.

    Bytes and files are sent unchanged (the server decodes them); PIL images and
    numpy arrays are encoded to PNG, which is lossless, so the server sees exactly
    these pixels.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if isinstance(image, Image.Image):
        return _png(image)
    if isinstance(image, np.ndarray):
        return _array_to_png(image)
    read = getattr(image, "read", None)
    if callable(read):
        data = read()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("image file objects must be opened in binary mode ('rb')")
        return bytes(data)
    raise TypeError(
        "image must be a path, bytes, a binary file object, a PIL.Image.Image or a numpy array, "
        f"got {type(image).__name__}"
    )
