"""Finding the wheel's tritonserver: numpy 2 is refused at start, where its stub would die on the first request."""

from __future__ import annotations

import os
import site
import subprocess
import venv
from pathlib import Path

import pytest

from blip2_triton.supervisor import install
from blip2_triton.supervisor.settings import LauncherError


def _numpy(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(install, "_stub_numpy_version", lambda: version)
    monkeypatch.setattr(install.shutil, "which", lambda name: None)  # never the NGC container's binary here


def _package(folder: Path, version: str) -> Path:
    (folder / "numpy").mkdir(parents=True)
    (folder / "numpy" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    return folder


def test_numpy_2_is_refused_with_the_fix_in_the_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _numpy(monkeypatch, "2.2.6")
    with pytest.raises(LauncherError, match=r"numpy 2\.2\.6.*numpy<2"):
        install.find_tritonserver(tmp_path)


def test_numpy_1_finds_the_wheels_tritonserver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _numpy(monkeypatch, "1.26.4")
    found = install.find_tritonserver(tmp_path)
    assert found.binary.name == "tritonserver" and found.binary.exists()
    assert found.backend_directory is not None and (found.backend_directory / "python"
                                                    / "triton_python_backend_stub").exists()


def test_a_numpy_1_on_pythonpath_does_not_hide_the_numpy_2_the_stub_imports(tmp_path: Path) -> None:
    # An environment whose own numpy is 2 (a stand-in package), then this one's packages (the wheel, the project).
    venv.EnvBuilder(symlinks=True, with_pip=False).create(tmp_path / "env")
    python = tmp_path / "env" / "bin" / "python"
    purelib = subprocess.run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    _package(Path(purelib), "2.2.6")
    (Path(purelib) / "this_environment.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()))
    # The stub ignores PYTHONPATH, so the numpy 1 put first there must not pass the check.
    env = {**os.environ, "PYTHONPATH": str(_package(tmp_path / "shadow", "1.26.4"))}
    run = subprocess.run([str(python), "-c", "import numpy, pathlib; print(numpy.__version__); "
                          "from blip2_triton.supervisor import install; install.shutil.which = lambda name: None; "
                          f"install.find_tritonserver(pathlib.Path({str(tmp_path / 'cache')!r}))"],
                         env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "1.26.4"  # what this process imports
    assert run.returncode != 0 and "found numpy 2.2.6" in run.stderr, run.stderr
