"""The browser playground at `/playground`: one static page (`static/playground.html`, inline script and style,
nothing fetched from elsewhere) that captions images and answers questions through the OpenAI routes, streamed.

It is served without an API key, like health: a browser opening a URL cannot send an `Authorization` header, and
the page holds no data. Everything it does goes through `/v1/...`, whose calls carry the key the user types, so
keys guard the same requests with or without it. `BLIP2_FRONT_PLAYGROUND=false` removes both routes."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from .common import request_state

PATH = "/playground"
INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.S)


@functools.cache
def page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy, which allows exactly its own inline script and style (by hash),
    `data:` images (the preview) and requests to this origin."""
    html = resources.files(__package__).joinpath("static", "playground.html").read_text("utf-8")
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for kind, body in INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
    policy = "; ".join([
        "default-src 'none'", f"script-src {' '.join(hashes['script'])}", f"style-src {' '.join(hashes['style'])}",
        "img-src data:", "connect-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
    ])
    return html.encode(), policy


async def playground(request: Request) -> Response:
    request_state(request)["route"] = PATH
    body, policy = page()
    return Response(body, media_type="text/html; charset=utf-8", headers={
        "content-security-policy": policy, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
        "x-frame-options": "DENY", "cache-control": "no-cache"})


async def to_playground(request: Request) -> Response:
    request_state(request)["route"] = "/"
    return RedirectResponse(PATH, status_code=307)


def routes() -> list[Route]:
    return [Route(PATH, playground, methods=["GET", "HEAD"]), Route("/", to_playground, methods=["GET", "HEAD"])]
