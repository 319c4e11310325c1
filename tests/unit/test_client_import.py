from __future__ import annotations

import subprocess
import sys
from importlib import resources

import blip2_client

HEAVY = ("torch", "transformers", "blip2_triton", "triton_python_backend_utils")


def test_import_does_not_load_server_dependencies() -> None:
    code = (
        "import sys, blip2_client, blip2_client.cli\n"
        "from blip2_client import Blip2Client, AsyncBlip2Client\n"
        "Blip2Client('localhost:8001'); AsyncBlip2Client('http://localhost:8000')\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_package_is_typed() -> None:
    assert resources.files(blip2_client).joinpath("py.typed").is_file()


def test_public_api() -> None:
    assert set(blip2_client.__all__) >= {
        "Blip2Client",
        "AsyncBlip2Client",
        "Blip2Error",
        "InvalidInputError",
        "ServerUnavailableError",
        "DeadlineExceededError",
        "StreamingUnsupportedError",
    }
