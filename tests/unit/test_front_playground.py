"""The playground page as served: self-contained (nothing fetched from another origin, no CDN, no fonts), under a
Content-Security-Policy that admits exactly its own inline script and style, and reachable from `/`."""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.applications import Starlette
from starlette.testclient import TestClient

from blip2_triton.front import playground


def client() -> TestClient:
    return TestClient(Starlette(routes=playground.routes()), follow_redirects=False)


def test_page_is_served_with_a_policy_that_admits_only_its_own_code() -> None:
    response = client().get("/playground")
    assert response.status_code == 200 and response.headers["content-type"] == "text/html; charset=utf-8"
    html = response.text
    policy = dict(part.split(" ", 1) for part in response.headers["content-security-policy"].split("; "))
    for kind in ("script", "style"):
        blocks = re.findall(rf"<{kind}>(.*?)</{kind}>", html, re.S)
        assert len(blocks) == 1, f"one inline <{kind}> block expected"
        digest = base64.b64encode(hashlib.sha256(blocks[0].encode()).digest()).decode()
        assert policy[f"{kind}-src"] == f"'sha256-{digest}'"
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_page_loads_nothing_from_elsewhere() -> None:
    html = client().get("/playground").text
    # Every src/href is a data: URL, and no script or style pulls in another file.
    assert re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", html) == ["data:,"]
    assert not re.search(r"https?://|@import|url\(|<script [^>]*src|<link [^>]*stylesheet", html)
    # The API it calls is this origin's.
    assert {"/v1/models", "/v1/chat/completions"} <= set(re.findall(r'fetch\("([^"]+)"', html))


def test_root_redirects_to_the_page() -> None:
    for method in ("GET", "HEAD"):
        response = client().request(method, "/")
        assert response.status_code == 307 and response.headers["location"] == "/playground"
    assert client().head("/playground").status_code == 200
