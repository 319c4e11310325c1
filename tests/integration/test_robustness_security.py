"""The launcher's locked-down server, for real: model load/unload, shared-memory registration, trace and log
settings are refused over HTTP and gRPC without the admin key; the key (TRITON_ADMIN_KEY, else random) opens
them; inference, health, metadata and statistics stay open."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from blip2_triton.supervisor import ADMIN_KEY_HEADER

pytestmark = pytest.mark.integration

# Triton's gRPC frontend reads restricted-protocol headers under this prefix.
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_KEY_HEADER


def http_call(url: str, method: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
              ) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_admin_apis_refused_over_http_without_the_key(triton_server: Any) -> None:
    base = triton_server.http_url
    region = {"key": "/blip2-test-region", "offset": 0, "byte_size": 64}
    refused = [
        ("POST", "/v2/repository/models/blip2/load", None),
        ("POST", "/v2/repository/models/blip2/unload", None),
        ("POST", "/v2/repository/index", None),
        ("POST", "/v2/systemsharedmemory/region/attack/register", region),
        ("POST", "/v2/cudasharedmemory/region/attack/register", {"raw_handle": {"b64": "AA=="}, "device_id": 0,
                                                                  "byte_size": 64}),
        ("POST", "/v2/systemsharedmemory/unregister", None),
        ("GET", "/v2/trace/setting", None),
        ("POST", "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
        ("GET", "/v2/logging", None),
        ("POST", "/v2/logging", {"log_verbose_level": 1}),
    ]
    for method, path, body in refused:
        for headers in ({}, {ADMIN_KEY_HEADER: "guess"}):
            status, text = http_call(base + path, method, body, headers)
            assert status == 403, f"{method} {path} with {headers}: {status} {text}"
            assert ADMIN_KEY_HEADER in text
    # Nothing changed: the model is still loaded and serving.
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/blip2/ready", "/v2/models/blip2",
                 "/v2/models/blip2/config", "/v2/models/blip2/stats"):
        assert http_call(base + path, "GET")[0] == 200, path
    # The operator's key opens them (read-only calls: the shared server must keep its models).
    key = triton_server.settings.admin_key
    status, text = http_call(base + "/v2/repository/index", "POST", None, {ADMIN_KEY_HEADER: key})
    assert status == 200 and '"blip2"' in text


def test_admin_apis_refused_over_grpc_without_the_key(triton_server: Any) -> None:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        for call in (
            lambda: client.load_model("blip2"),
            lambda: client.unload_model("blip2"),
            lambda: client.register_system_shared_memory("attack", "/blip2-test-region", 64),
            lambda: client.register_cuda_shared_memory("attack", b"\0" * 64, 0, 64),
            lambda: client.unregister_system_shared_memory(),
            lambda: client.get_model_repository_index(),
            lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
            lambda: client.update_log_settings(settings={"log_verbose_level": 1}),
            lambda: client.load_model("blip2", headers={GRPC_ADMIN_HEADER: "guess"}),
        ):
            with pytest.raises(InferenceServerException, match=ADMIN_KEY_HEADER):
                call()
        assert client.is_model_ready("blip2")
        index = client.get_model_repository_index(headers={GRPC_ADMIN_HEADER: triton_server.settings.admin_key},
                                                  as_json=True)
        assert "blip2" in {m["name"] for m in index["models"]}
    finally:
        client.close()


def test_http_client_library_calls_are_refused_too(triton_server: Any) -> None:
    client = httpclient.InferenceServerClient(triton_server.http_hostport)
    try:
        with pytest.raises(InferenceServerException, match=ADMIN_KEY_HEADER):
            client.unload_model("blip2")
        with pytest.raises(InferenceServerException, match=ADMIN_KEY_HEADER):
            client.register_system_shared_memory("attack", "/blip2-test-region", 64)
        assert client.is_model_ready("blip2")
    finally:
        client.close()
