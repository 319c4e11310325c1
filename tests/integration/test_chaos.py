"""The chaos run (scripts/chaos.py) at a CI size: every attack of the reliability issue against `blip2-triton
serve` with good traffic beside it; the script's own checks must all pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_the_chaos_run_passes_every_check(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--streams", "60", "--oversize-mb", "70",
         "--threads", "4", "--workdir", str(tmp_path), "--json", str(report_path)],
        capture_output=True, text=True, timeout=1200,
    )
    assert report_path.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    failed = [name for name, passed in report["checks"].items() if not passed]
    assert not failed, f"{failed}\n{run.stdout[-4000:]}"
    assert run.returncode == 0
    assert report["traffic"]["succeeded"] > 0 and not report["traffic"]["failures"]
