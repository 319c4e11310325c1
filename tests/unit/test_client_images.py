from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from blip2_client import encode_image
from PIL import Image


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


@pytest.fixture
def jpeg_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


def test_bytes_like_pass_through_unchanged(jpeg_bytes: bytes) -> None:
    assert encode_image(jpeg_bytes) == jpeg_bytes
    assert encode_image(bytearray(jpeg_bytes)) == jpeg_bytes
    assert encode_image(memoryview(jpeg_bytes)) == jpeg_bytes
    # Invalid bytes are the server's to reject, with its own message.
    assert encode_image(b"not an image") == b"not an image"


def test_paths_are_read(tmp_path: Path, jpeg_bytes: bytes) -> None:
    path = tmp_path / "cat.jpg"
    path.write_bytes(jpeg_bytes)
    assert encode_image(path) == jpeg_bytes
    assert encode_image(str(path)) == jpeg_bytes


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        encode_image(tmp_path / "missing.jpg")


def test_binary_file_objects_are_read(tmp_path: Path, jpeg_bytes: bytes) -> None:
    assert encode_image(io.BytesIO(jpeg_bytes)) == jpeg_bytes
    path = tmp_path / "cat.jpg"
    path.write_bytes(jpeg_bytes)
    with open(path, "rb") as f:
        assert encode_image(f) == jpeg_bytes


def test_text_file_objects_are_rejected() -> None:
    with pytest.raises(TypeError, match="binary mode"):
        encode_image(io.StringIO("hello"))  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "1"])
def test_pil_images_become_lossless_png(mode: str, rgb: np.ndarray) -> None:
    img = Image.fromarray(rgb).convert(mode)
    data = encode_image(img)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    back = _decode(data)
    assert back.mode == mode
    assert np.array_equal(np.asarray(back), np.asarray(img))


def test_pil_modes_png_cannot_store_go_through_rgb(rgb: np.ndarray) -> None:
    img = Image.fromarray(rgb).convert("CMYK")
    back = _decode(encode_image(img))
    assert back.mode == "RGB"
    assert np.array_equal(np.asarray(back), np.asarray(img.convert("RGB")))


@pytest.mark.parametrize(
    ("shape", "mode"),
    [((5, 7), "L"), ((5, 7, 1), "L"), ((5, 7, 3), "RGB"), ((5, 7, 4), "RGBA")],
)
def test_numpy_arrays_become_lossless_png(shape: tuple[int, ...], mode: str) -> None:
    arr = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
    back = _decode(encode_image(arr))
    assert back.mode == mode
    expected = arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
    assert np.array_equal(np.asarray(back), expected)


def test_non_contiguous_numpy_arrays_are_encoded(rgb: np.ndarray) -> None:
    view = rgb[:, ::-1]
    assert np.array_equal(np.asarray(_decode(encode_image(view))), view)


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.uint16, np.bool_])
def test_numpy_arrays_must_be_uint8(dtype: type) -> None:
    with pytest.raises(TypeError, match="uint8"):
        encode_image(np.zeros((4, 4, 3), dtype=dtype))


@pytest.mark.parametrize("shape", [(4,), (4, 4, 2), (4, 4, 5), (2, 4, 4, 3), (0, 4, 3)])
def test_numpy_arrays_must_be_images(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="shape"):
        encode_image(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("value", [None, 3, 1.5, ["a"], {"image": b""}])
def test_unsupported_types_raise_type_error(value: object) -> None:
    with pytest.raises(TypeError, match="image must be"):
        encode_image(value)  # type: ignore[arg-type]
