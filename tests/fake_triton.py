"""A stand-in `tritonserver` for supervisor tests without Triton, found first on PATH as the NGC container's would
be: it records its argv, starts one process named like a Python backend stub, answers the health and statistics
endpoints, and exits on SIGTERM (after FAKE_EXIT_AFTER seconds with FAKE_EXIT_CODE, when set)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from blip2_triton.supervisor.processes import STUB_BINARY

ROOT = Path(__file__).resolve().parents[1]

FAKE_STUB = "#!{python}\nimport time\ntime.sleep(600)\n"

FAKE_SERVER = '''#!{python}
import http.server, json, os, signal, subprocess, sys, threading, time
import psutil
from blip2_triton.supervisor.processes import end_with_parent

if os.environ.get("FAKE_ARGV"):
    with open(os.environ["FAKE_ARGV"], "w") as f:
        json.dump(sys.argv, f)
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
# Like Triton's stubs, it ends after its server, never before.
stub = subprocess.Popen([os.environ["FAKE_STUB"], "model.py", "triton_python_backend_shm_region_f", "1", "1",
                         str(os.getpid()), "/b", "336", "fake_vision_0_0", "DEFAULT"], preexec_fn=end_with_parent())
while "fake_vision_0_0" not in psutil.Process(stub.pid).cmdline():
    time.sleep(0.01)  # ready only once the stub runs, as Triton's models are


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = json.dumps({{"model_stats": []}}).encode() if "stats" in self.path else b""
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", int(args["http-port"])), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
print("fake tritonserver up", flush=True)
stop.wait(float(os.environ["FAKE_EXIT_AFTER"]) if os.environ.get("FAKE_EXIT_AFTER") else None)
sys.exit(int(os.environ.get("FAKE_EXIT_CODE", "0")))
'''


def fake_install(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The fake tritonserver and stub in `tmp_path/bin`, and an environment (no BLIP2_/TRITON_ settings) that finds
    them, and `blip2-triton`, on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("tritonserver", FAKE_SERVER), (STUB_BINARY, FAKE_STUB)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP2_", "TRITON_"))}
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FAKE_STUB"] = str(bin_dir / STUB_BINARY)
    return bin_dir / "tritonserver", env


class Supervised:
    """A supervisor process (the container entrypoint or `blip2-triton serve`), its output in a file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    @classmethod
    def entrypoint(cls, env: dict[str, str], log: Path, *args: str) -> Supervised:
        return cls(["bash", str(ROOT / "docker" / "entrypoint.sh"), *args], env, log)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, count: int = 1, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.text().count(text) < count:
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, f"{text!r} x{count} not logged:\n{self.text()}"
            time.sleep(0.05)

    def signal(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
