"""One real tritonserver per test session, on free ports, serving the tiny OPT checkpoint as `blip2` and the
tiny FlanT5 checkpoint as `blip2_t5` at the same time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blip2_triton.launcher import TritonServer, free_port


def start_server(log_dir: Path, name: str, **kwargs: object) -> TritonServer:
    server = TritonServer(
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        startup_timeout_s=300,
        exit_timeout_s=10,
        log_path=log_dir / f"{name}.log",
        **kwargs,  # type: ignore[arg-type]
    )
    return server.start()


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
