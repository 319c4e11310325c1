"""Finding the wheel's tritonserver: numpy 2 is refused at start, where its stub would die on the first request."""

from __future__ import annotations

from pathlib import Path

import pytest

from blip2_triton.supervisor import install
from blip2_triton.supervisor.settings import LauncherError


def _numpy(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    import numpy

    monkeypatch.setattr(numpy, "__version__", version)
    monkeypatch.setattr(install.shutil, "which", lambda name: None)  # never the NGC container's binary here


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
