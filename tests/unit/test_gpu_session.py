"""`bench/gpu_session.py`, the one call a GPU session makes: it unpacks the carried kit into a virtual environment
whose isolated interpreter (as tritonserver's stage stubs run it) imports the kit first, writes the preflight and each
phase's JSON and log under the output folder. Run here in its CPU smoke mode."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _kit(folder: Path, name: str = "blip2_kit_marker.py", data: bytes = b"WHERE = 'kit'\n") -> Path:
    folder.mkdir()
    with tarfile.open(folder / "marker.tar.xz", "w:xz") as tar:
        member = tarfile.TarInfo(name)
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return folder


def _isolated(python: Path, code: str) -> str:
    # -I: no PYTHONPATH, no script directory, as the Python backend stub's embedded interpreter starts.
    return subprocess.run([str(python), "-I", "-c", code], cwd="/", capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_isolated_interpreter_imports_the_kit_before_this_environments_packages(import_bench,
                                                                                    tmp_path: Path) -> None:
    session = import_bench("gpu_session")
    # A kit module named as one of this environment's packages: the stubs must import the kit's.
    kit = _kit(tmp_path / "kit", "numpy/__init__.py", b"__version__ = '1.0.0-kit'\n")
    python, unpacked = session.make_venv(tmp_path / "venv", kit)
    assert unpacked == ["marker.tar.xz"]
    assert _isolated(python, "import numpy; print(numpy.__version__)") == "1.0.0-kit"
    # The project from this checkout, and this environment's own packages after the kit.
    assert _isolated(python, "import blip2_triton; print(blip2_triton.__file__)") == str(
        ROOT / "src" / "blip2_triton" / "__init__.py")
    found = _isolated(python, "import importlib.util as u; print(*(u.find_spec(m).origin for m in "
                              "('gpu_check', 'blip2_client', 'torch')))").split()
    assert found[:2] == [str(ROOT / "bench" / "gpu_check.py"), str(ROOT / "client" / "blip2_client" / "__init__.py")]
    assert found[2].endswith("torch/__init__.py")


def test_smoke_session_writes_preflight_and_phase_results(import_bench, tmp_path: Path) -> None:
    session = import_bench("gpu_session")
    venv, out = tmp_path / "venv", tmp_path / "out"
    assert session.main(["--smoke", "--kit", str(_kit(tmp_path / "kit")), "--venv", str(venv), "--out", str(out),
                         "check"]) == 0
    assert _isolated(venv / "bin" / "python", "import blip2_kit_marker; print(blip2_kit_marker.WHERE)") == "kit"
    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["kit"] == ["marker.tar.xz"] and preflight["preflight_rc"] == 0
    assert preflight["cuda"] is False and preflight["numpy_imported"].startswith("1.")
    assert not preflight["numpy_imported_from"].startswith(str(venv))  # this kit brings no numpy
    assert preflight["tritonclient_imported"].endswith("grpc/__init__.py")
    assert preflight["stub_missing_libraries"] == []
    check = json.loads((out / "check.json").read_text())
    assert check["shapes"] == "tiny" and check["single_request"]["text_matches_hf"] is True
    assert (out / "check.log").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["check.json", "check.log", "preflight.json"]


def test_the_in_process_phase_runs_on_the_machines_own_numpy(import_bench, tmp_path: Path) -> None:
    session = import_bench("gpu_session")
    # A kit numpy that cannot import: the preflight (as the stubs) meets it, the check phase must not.
    kit = _kit(tmp_path / "kit", "numpy/__init__.py", b"raise ImportError('the kit numpy')\n")
    out = tmp_path / "out"
    assert session.main(["--smoke", "--kit", str(kit), "--venv", str(tmp_path / "venv"), "--out", str(out),
                         "check"]) == 0
    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["preflight_rc"] != 0 and "the kit numpy" in preflight["preflight_error"]
    check = json.loads((out / "check.json").read_text())
    assert check["single_request"]["text_matches_hf"] is True
