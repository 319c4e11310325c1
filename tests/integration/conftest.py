"""One real tritonserver per test session, on free ports, serving the tiny OPT checkpoint as `blip2` and the
tiny FlanT5 checkpoint as `blip2_t5` at the same time; a second one, started when a test needs it, serves the
embedded default (the trained scenes model) as `blip2-triton serve` does without a model id."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from triton_helpers import start_server

from blip2_triton.supervisor import TritonServer

# Every `serve` a test starts binds its front's metrics to a free port, not the default 8003 that another
# process on the machine may hold.
os.environ.setdefault("BLIP2_FRONT_METRICS_PORT", "0")


@pytest.fixture(scope="session")
def server_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("triton-logs")


@pytest.fixture(scope="session")
def triton_server(tiny_model_dir: Path, tiny_t5_model_dir: Path, server_log_dir: Path) -> Iterator[TritonServer]:
    server = start_server(
        server_log_dir, "main", model_id=str(tiny_model_dir), t5_model_id=str(tiny_t5_model_dir)
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def default_server(server_log_dir: Path) -> Iterator[TritonServer]:
    server = start_server(server_log_dir, "default")
    try:
        yield server
    finally:
        server.stop()


# Client tests run over both protocols against the session server.
@pytest.fixture(params=["grpc", "http"])
def protocol(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def url(triton_server: Any, protocol: str) -> str:
    return triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
