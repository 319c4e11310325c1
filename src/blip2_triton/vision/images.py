"""Image bytes -> the RGB image the HF reference decodes (`Image.open(f).convert("RGB")`), within the limits."""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from ..errors import InvalidRequestError
from ..options import ServerOptions
from ..requests import ImageRequest

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})
# A progressive JPEG re-walks every block of the image once per scan, so a small file with thousands of tiny
# scans costs minutes of CPU at the pixel limit. Encoders write about 10; libjpeg-turbo's own tools cap at 500.
MAX_JPEG_SCANS = 500
# A marker inside entropy-coded data: FF followed by anything but a stuffed 00, a restart marker or fill.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Decoder messages may name files or objects of the server process; clients get them without.
_UNSAFE_DETAIL = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s:;,)]+|<[^>]*>|0x[0-9a-fA-F]+")


def _client_detail(error: BaseException) -> str:
    text = _UNSAFE_DETAIL.sub("…", str(error)).strip()
    return (text[:160] + "…" if len(text) > 160 else text) or type(error).__name__


def jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers of a JPEG, found by walking its segments: FF DA inside a comment or other metadata
    segment is not a scan. Counting stops once the limit is passed."""
    pos, scans = 2, 0
    while pos + 4 <= len(data) and scans <= MAX_JPEG_SCANS:
        if data[pos] != 0xFF:
            return scans  # not a marker where one must be: the decoder reports the damage
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # end of image (an MPO's next image follows: counted by the walk below)
            nxt = data.find(b"\xff\xd8", pos + 2)
            if nxt < 0:
                return scans
            pos = nxt + 2
            continue
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        pos += 2 + length
        if marker == 0xDA:
            scans += 1
            # Entropy-coded data runs until the next real marker (every FF in it is stuffed as FF 00).
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                return scans
            pos = found.start()
    return scans


def decode_image(request: ImageRequest, options: ServerOptions) -> Image.Image:
    """Decodes like the HF reference (`Image.open(f).convert("RGB")`), within the configured limits.

    Animated images yield their first frame; EXIF orientation is not applied, as in the reference. No draft or
    reduced decoding: an image within the limits decodes to exactly the reference's pixels.
    """
    request.validate(options)
    if options.max_image_pixels != Image.MAX_IMAGE_PIXELS:
        # PIL refuses at open() beyond twice its own limit, before the configured check below runs. Tied to the
        # configured limit, PIL lets every image within it through (a raised limit used to be cut at ~179 MP).
        Image.MAX_IMAGE_PIXELS = options.max_image_pixels
    try:
        with warnings.catch_warnings():
            # PIL warns about corrupt metadata and at its own bomb limit (ours below decides); per-request
            # warnings from untrusted input would only flood the server log.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(request.data))
            fmt = img.format or "unknown"
            if fmt not in ACCEPTED_FORMATS:
                raise InvalidRequestError(
                    f"image: expected JPEG, PNG, WebP, BMP, GIF or TIFF, got {fmt}"
                )
            width, height = img.size
            if width < 1 or height < 1:
                raise InvalidRequestError(f"image: expected non-empty dimensions, got {width}x{height}")
            if width * height > options.max_image_pixels:
                raise InvalidRequestError(
                    f"image: expected at most {options.max_image_pixels} pixels, got {width}x{height}"
                )
            if fmt in ("JPEG", "MPO"):
                scans = jpeg_scans(request.data)
                if scans > MAX_JPEG_SCANS:
                    raise InvalidRequestError(f"image: expected at most {MAX_JPEG_SCANS} JPEG scans, got more")
            img.load()
            return img.convert("RGB")
    except InvalidRequestError:
        raise
    except Image.DecompressionBombError as e:
        # PIL refuses at open() beyond twice its own limit, before our dimension check can run.
        raise InvalidRequestError(
            f"image: expected at most {options.max_image_pixels} pixels, got a larger image"
        ) from e
    except UnidentifiedImageError as e:
        raise InvalidRequestError("image: bytes are not a supported image file") from e
    except MemoryError:
        # Within the pixel limit this is the server running short, not the request's fault.
        raise
    except Exception as e:
        # Any other decoder failure on untrusted bytes (PIL raises OSError, SyntaxError, ValueError, EOFError,
        # struct.error, IndexError, ... on malformed files) is this request's problem alone.
        raise InvalidRequestError(f"image: corrupt or truncated image data ({_client_detail(e)})") from e
