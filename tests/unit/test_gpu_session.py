"""`bench/gpu_session.py`, the one call a GPU session makes: it unpacks the carried kit first on the path, writes the
preflight and each phase's JSON and log under the output folder. Run here in its CPU smoke mode."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def _kit(folder: Path) -> Path:
    folder.mkdir()
    data = b"WHERE = 'kit'\n"
    with tarfile.open(folder / "marker.tar.xz", "w:xz") as tar:
        member = tarfile.TarInfo("blip2_kit_marker.py")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return folder


def test_smoke_session_writes_preflight_and_phase_results(import_bench, tmp_path: Path) -> None:
    session = import_bench("gpu_session")
    site, out = tmp_path / "site", tmp_path / "out"
    assert session.main(["--smoke", "--kit", str(_kit(tmp_path / "kit")), "--site", str(site), "--out", str(out),
                         "check"]) == 0
    assert (site / "blip2_kit_marker.py").read_text() == "WHERE = 'kit'\n"
    assert session.environment(site)["PYTHONPATH"].split(":")[0] == str(site)
    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["kit"] == ["marker.tar.xz"] and preflight["preflight_rc"] == 0
    assert preflight["cuda"] is False and preflight["numpy_imported"].startswith("1.")
    assert preflight["stub_missing_libraries"] == []
    check = json.loads((out / "check.json").read_text())
    assert check["shapes"] == "tiny" and check["single_request"]["text_matches_hf"] is True
    assert (out / "check.log").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["check.json", "check.log", "preflight.json"]
