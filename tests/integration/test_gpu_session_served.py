"""`bench/gpu_session.py`'s served phase in its CPU smoke mode: tritonserver started from the session's virtual
environment, its stages' log brought back beside the phase's JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_reports import errors_in

pytestmark = pytest.mark.integration


def test_served_phase_reports_every_figure_and_brings_back_its_servers_logs(import_bench, tmp_path: Path) -> None:
    session = import_bench("gpu_session")
    out, workdir = tmp_path / "out", tmp_path / "served"
    workdir.mkdir()
    (workdir / "inflight.log").write_text("an earlier run's line\n")  # the logs are appended to: not brought back
    assert session.main(["--smoke", "--kit", str(tmp_path / "no-kit"), "--venv", str(tmp_path / "venv"),
                         "--out", str(out), "--served-workdir", str(workdir), "served"]) == 0
    served = json.loads((out / "served.json").read_text())
    assert served["single_caption"]["served_ms"] > 0 and errors_in(served) == []
    logs = (out / "servers.log").read_text()
    assert logs.startswith("==> inflight.log <==\n") and "==> static.log <==\n" in logs
    assert "blip2_vision: model instance ready" in logs and "an earlier run's line" not in logs
    assert sorted(p.name for p in out.iterdir()) == ["preflight.json", "served.json", "served.log", "servers.log"]
