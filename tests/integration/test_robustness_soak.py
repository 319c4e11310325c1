"""The soak script's short version against the session server: steady load, zero failures, every answer
consistent, RSS of tritonserver and each stub sampled before and after (bounded growth)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_has_no_failures_and_bounded_memory(triton_server: Any, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "soak.py"), "--grpc-url", triton_server.grpc_url,
           "--server-pid", str(triton_server.process.pid), "--duration-s", "20", "--warmup-s", "5",
           "--threads", "3", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["requests"] >= 20 and result["failures"] == 0 and result["inconsistent"] == 0
    names = {row["process"] for row in result["processes"]}
    assert "tritonserver" in names and {"stub blip2_vision_0_0", "stub blip2_llm_0_0"} <= names
    assert all(row["growth_mb"] is not None and row["growth_mb"] <= 64 for row in result["processes"])
