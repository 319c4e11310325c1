"""The client installs into an empty venv (no torch, no server code) and captions an image."""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
Reference = Callable[[bytes, "str | None", int], str]

PROBE = """
import importlib.util, sys
from blip2_client import Blip2Client
for name in ("torch", "transformers", "blip2_triton"):
    assert importlib.util.find_spec(name) is None, name + " is installed in the clean venv"
with Blip2Client(sys.argv[1], protocol=sys.argv[2]) as client:
    print(client.caption(sys.argv[3], max_tokens=12))
"""


def test_clean_venv_install_and_caption(
    triton_server: Any, sample_images: dict[str, bytes], reference: Reference, tmp_path: Path
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # Keep the project's venv out of the child's view (pytest may run with it activated).
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    # A copy without build/ and *.egg-info, so stale artifacts of editable installs cannot leak in.
    source = shutil.copytree(
        CLIENT_DIR, tmp_path / "client", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    image = tmp_path / "car.jpg"
    image.write_bytes(sample_images["rgb_jpeg"])
    expected = reference(sample_images["rgb_jpeg"], None, 12)
    for url, protocol in ((triton_server.grpc_url, "grpc"), (triton_server.http_url, "http")):
        proc = subprocess.run(
            [str(python), "-c", PROBE, url, protocol, str(image)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,  # not the repo root, so nothing is imported from the checkout
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == expected + "\n"

    proc = subprocess.run(
        [str(env_dir / "bin" / "blip2"), "caption", str(image), "--url", triton_server.grpc_url, "--max-tokens", "12"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert (proc.returncode, proc.stdout) == (0, expected + "\n"), proc.stderr
