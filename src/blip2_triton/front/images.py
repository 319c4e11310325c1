"""Image bytes for the OpenAI routes: `data:` URLs always; http(s) URLs only for hosts the operator allows, with
the size and time limits of the front. Nothing here decodes the image: the vision stage does that (and judges it)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import urllib.parse

import httpx

from .openai_api import ChatRequestError, ImageRef


def data_url_bytes(ref: ImageRef, max_bytes: int) -> bytes:
    header, sep, payload = ref.url.partition(",")
    media = header[len("data:"):]
    if not sep or not media.endswith(";base64"):
        raise ChatRequestError(ref.param, "expected a base64 data URL (data:image/...;base64,...)")
    media_type = media[: -len(";base64")].split(";")[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise ChatRequestError(ref.param, f"expected an image/* media type, got {media_type!r}")
    # Base64 makes 3 bytes of 4 characters: refuse before decoding anything too large.
    estimated = len(payload) * 3 // 4
    if estimated > max_bytes + 2:
        raise ChatRequestError(ref.param, f"expected an image of at most {max_bytes} bytes, got about {estimated}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ChatRequestError(ref.param, f"the data URL is not valid base64 ({e})") from e
    if not data:
        raise ChatRequestError(ref.param, "expected image bytes, got an empty data URL")
    if len(data) > max_bytes:
        raise ChatRequestError(ref.param, f"expected an image of at most {max_bytes} bytes, got {len(data)}")
    return data


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(fnmatch.fnmatchcase(host, p.lower()) if p.startswith("*.") else host == p.lower() for p in patterns)


async def fetch_image(ref: ImageRef, client: httpx.AsyncClient, *, allowed_hosts: tuple[str, ...], max_bytes: int,
                      timeout_s: float) -> bytes:
    parsed = urllib.parse.urlsplit(ref.url)
    if parsed.scheme not in ("http", "https"):
        raise ChatRequestError(ref.param, f"expected a data: URL or an http(s) URL, got scheme {parsed.scheme!r}")
    if not allowed_hosts:
        raise ChatRequestError(ref.param, "image URLs are disabled on this server; send the image as a data: URL")
    if parsed.username or parsed.password or not parsed.hostname or not host_allowed(parsed.hostname, allowed_hosts):
        raise ChatRequestError(ref.param, f"host {parsed.hostname!r} is not on this server's image URL allow-list")
    try:
        return await asyncio.wait_for(_download(ref, client, max_bytes), timeout_s)
    except asyncio.TimeoutError as e:
        raise ChatRequestError(ref.param, f"fetching the image took longer than {timeout_s:g} s") from e
    except httpx.HTTPError as e:
        raise ChatRequestError(ref.param, f"fetching the image failed ({type(e).__name__})") from e


async def _download(ref: ImageRef, client: httpx.AsyncClient, max_bytes: int) -> bytes:
    # Redirects are not followed: the target could be a host the allow-list does not name.
    async with client.stream("GET", ref.url, follow_redirects=False,
                             headers={"accept-encoding": "identity"}) as response:
        if response.status_code != 200:
            raise ChatRequestError(ref.param, f"fetching the image returned HTTP {response.status_code}")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise ChatRequestError(ref.param, f"expected an image of at most {max_bytes} bytes, got {declared}")
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > max_bytes:
                raise ChatRequestError(ref.param, f"expected an image of at most {max_bytes} bytes, got more")
    if not data:
        raise ChatRequestError(ref.param, "the image URL returned no bytes")
    return bytes(data)


async def image_bytes(ref: ImageRef, client: httpx.AsyncClient, *, allowed_hosts: tuple[str, ...], max_bytes: int,
                      timeout_s: float) -> bytes:
    if ref.url[:5].lower() == "data:":
        return data_url_bytes(ref, max_bytes)
    return await fetch_image(ref, client, allowed_hosts=allowed_hosts, max_bytes=max_bytes, timeout_s=timeout_s)
