"""Finding `tritonserver`: the one on PATH in the NGC container, else the one bundled in the `nvidia-pytriton`
wheel, which needs a Python backend stub for the running interpreter and library paths (set up in a cache
directory, never in site-packages)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..options import default_cache_dir
from .settings import LauncherError


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_directory: Path | None
    env: dict[str, str]


def find_tritonserver(cache_dir: Path | None = None) -> TritonInstall:
    on_path = shutil.which("tritonserver")
    if on_path and "pytriton" not in on_path:
        return TritonInstall(Path(on_path), None, {})
    bundled = _bundled_install(cache_dir or default_cache_dir())
    if bundled is None:
        raise LauncherError("tritonserver not found: run inside the NGC tritonserver container or "
                            "`pip install nvidia-pytriton`")
    return bundled


def _bundled_install(cache_dir: Path) -> TritonInstall | None:
    # Only the wheel's files are used: importing pytriton would pull in its Python API's dependencies.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.exists():
        return None
    _require_numpy_1()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise LauncherError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    # The backend directory must hold the stub of *this* interpreter; build it beside the wheel's files.
    backends = cache_dir / "triton-backends" / f"py{version}"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (root / "backends" / "python").iterdir():
        if src.is_file():
            _copy_if_changed(src, python_dir / src.name)
    _copy_if_changed(stub, python_dir / "triton_python_backend_stub")
    libs = root.parent.parent / "nvidia_pytriton.libs"
    env = {
        "LD_LIBRARY_PATH": os.pathsep.join(
            p for p in (sysconfig.get_config_var("LIBDIR"), str(libs), os.environ.get("LD_LIBRARY_PATH")) if p
        ),
        # The stub embeds libpython and finds the environment's site-packages from `python3` on PATH.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    return TritonInstall(binary, backends, env)


def _require_numpy_1() -> None:
    # The wheel's Triton 2.51 stub embeds pybind11 2.10, which reads numpy 2 arrays wrongly: the stub dies on the
    # first request (python_backend#384 fixed it in later releases). Refuse at start rather than at that request.
    found = _stub_numpy_version()
    if found is not None and int(found.split(".")[0]) >= 2:
        raise LauncherError(f"nvidia-pytriton's tritonserver 2.51 needs numpy 1.x in this environment, found numpy "
                            f"{found}: its Python backend stub dies on the first request with numpy 2. "
                            "Install numpy<2 (pip install 'numpy<2'), or use the NGC container")


def _stub_numpy_version() -> str | None:
    """The numpy version the stub will import, or None where it imports none."""
    # The stub runs this interpreter (the python3 first on PATH) isolated, ignoring PYTHONPATH: a numpy 1 put first
    # there reaches this process but never the stages, so ask an interpreter started the stub's way.
    probe = subprocess.run([sys.executable, "-I", "-c", "import numpy; print(numpy.__version__)"],
                           capture_output=True, text=True, timeout=120, check=False)
    return probe.stdout.strip() if probe.returncode == 0 else None


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    tmp = dst.with_suffix(dst.suffix + f".{os.getpid()}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)
