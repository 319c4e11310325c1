"""One call on the lent GPU machine: unpack the kit, check the machine, run the GPU benchmarks, keep their JSON.

    .venv/bin/python scripts/gpu_kit.py                    # here, once: builds .gpu-kit/ (ignored by git)
    python3 bench/gpu_session.py check served              # there: run(carry=[".gpu-kit"]), JSON under $OUT
    .venv/bin/python bench/gpu_session.py --smoke check served   # here: the same steps on CPU, tiny shapes

Phases, each in its own process under its own time limit, in the order given:
  check    bench/gpu_check.py (issue 21 and the vision graphs of issue 22)
  served   bench/gpu_served.py (issue 22: tritonserver with both stages on CUDA, 8-bit and 4-bit beside float16)
Writes preflight.json first (Python, torch, CUDA, GPU, numpy as the stages will see it, the stub's missing shared
libraries, bitsandbytes), then PHASE.json and the tail of PHASE.log per phase, and servers.log (what the served
phase's tritonservers and their stages logged): at most 8 files come back.

The kit goes into the site-packages of a virtual environment made here (`--venv`), which reaches the project's src/,
bench/ and client/ and this interpreter's own site-packages through a .pth file, after the kit. `served` runs its
python, so tritonserver's stage stubs do too: the stub's embedded interpreter runs isolated (it ignores PYTHONPATH)
and builds its path from the python3 first on PATH, which the launcher sets to the phase's own. `check` runs this
interpreter, on the machine's own packages (numpy 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import site
import subprocess
import sys
import tarfile
import time
import venv
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL_BYTES = 200_000

PHASES = {
    "check": (["bench/gpu_check.py"], ["--device", "cpu", "--tiny-shapes", "--latency-runs", "2", "--batches",
                                       "1", "--concurrency", "4", "--tokens", "6", "--graph-rows", "1,4",
                                       "--graph-cached", "40", "--graph-clients", "4", "--mixed-rounds", "1",
                                       "--vision-batches", "1,4"]),
    "served": (["bench/gpu_served.py"], ["--device", "cpu", "--tiny-shapes", "--clients", "2", "--rounds", "1",
                                         "--runs", "1", "--tokens", "4", "--mixed-requests", "4",
                                         "--quantization", ""]),
}
# Phases that start tritonserver run the virtual environment's python (its stubs need the kit's numpy 1.26); the
# others run this interpreter with the machine's own numpy 2, which its other packages (pandas, pyarrow, perhaps
# scikit-learn, which transformers imports where installed) may require.
KIT_PHASES = {"served"}


def unpack(kit: Path, site_packages: Path) -> list[str]:
    names = []
    for archive in sorted(kit.glob("*.tar.xz")):
        with tarfile.open(archive) as tar:
            tar.extractall(site_packages, filter="tar")
        names.append(archive.name)
    return names


def make_venv(path: Path, kit: Path) -> tuple[Path, list[str]]:
    """The interpreter of the phases that start tritonserver: a virtual environment whose site-packages holds the
    kit, then reaches the project and this interpreter's packages (torch, ...); returns its python and the archives
    unpacked."""
    venv.EnvBuilder(clear=True, symlinks=True, with_pip=False).create(path)
    python = path / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site_packages = Path(subprocess.run([str(python), "-I", "-c", purelib], capture_output=True, text=True,
                                        check=True).stdout.strip())
    unpacked = unpack(kit, site_packages) if kit.exists() else []
    # Entries of a .pth file come after the directory holding it, so the kit's numpy 1.26 shadows the machine's
    # numpy 2. addsitedir (not a plain path line) also runs that directory's own .pth files (editable installs).
    lines = [str(ROOT / "src"), str(ROOT / "bench"), str(ROOT / "client")]
    lines += [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages() if Path(d).is_dir()]
    (site_packages / "blip2_gpu_session.pth").write_text("\n".join(lines) + "\n")
    return python, unpacked


def environment(*, project_path: bool) -> dict[str, str]:
    env = dict(os.environ)
    # The stage stubs ignore PYTHONPATH: the virtual environment's phases run without it, to see what they see.
    env.pop("PYTHONPATH", None)
    if project_path:
        env["PYTHONPATH"] = os.pathsep.join(str(ROOT / d) for d in ("src", "bench", "client"))
    return env


PREFLIGHT = r"""
import importlib, json, importlib.metadata as md, platform, subprocess, sys
out = {"python": platform.python_version()}
for name in ("torch", "torchvision", "transformers", "numpy", "tokenizers", "accelerate", "grpcio", "protobuf",
             "bitsandbytes", "tritonclient"):
    try:
        out[name] = md.version(name)
    except md.PackageNotFoundError:
        out[name] = None
import numpy, torch
out["numpy_imported"] = numpy.__version__
out["numpy_imported_from"] = numpy.__file__  # the kit's is under --venv


def imported(key, module):
    try:
        out[f"{key}_imported"] = importlib.import_module(module).__file__
    except Exception as e:
        out[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"


imported("tritonclient", "tritonclient.grpc")  # the kit's copy carries no version metadata
imported("transformers_generation", "transformers.generation.utils")  # imports scikit-learn where installed
out["cuda"] = torch.cuda.is_available()
if out["cuda"]:
    out["gpu"] = torch.cuda.get_device_name(0)
    out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
try:
    from blip2_triton.supervisor.install import find_tritonserver
    install = find_tritonserver()
    out["tritonserver"] = str(install.binary)
    stub = install.backend_directory / "python" / "triton_python_backend_stub" if install.backend_directory else None
    if stub is not None:
        ldd = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env={**__import__("os").environ,
                             **install.env}).stdout
        out["stub_missing_libraries"] = [line.split()[0] for line in ldd.splitlines() if "not found" in line]
except Exception as e:
    out["tritonserver_error"] = f"{type(e).__name__}: {e}"
imported("bitsandbytes", "bitsandbytes")
print(json.dumps(out, indent=2))
"""


def server_logs(workdir: Path, before: dict[Path, int], out: Path) -> None:
    """What the served phase's tritonservers wrote to their logs (appended) in `workdir`: the stage processes' own
    output (a stub that died, a capture's error), which would stay on the machine. One file, each log's tail."""
    parts = []
    for log in sorted(workdir.glob("*.log")):
        with open(log, "rb") as f:
            f.seek(before.get(log, 0))
            data = f.read()
        if data:
            parts.append(f"==> {log.name} <==\n".encode() + data[-LOG_TAIL_BYTES:])
    if parts:
        (out / "servers.log").write_bytes(b"\n".join(parts))


def run_phase(python: Path, name: str, args: list[str], env: dict[str, str], out: Path, timeout_s: float
              ) -> dict[str, Any]:
    log = out / f"{name}.log"
    start = time.monotonic()
    with open(log, "wb") as sink:
        try:
            rc = subprocess.run([str(python), *args, "--output", str(out / f"{name}.json")], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    data = log.read_bytes()
    if len(data) > LOG_TAIL_BYTES:
        log.write_bytes(data[-LOG_TAIL_BYTES:])
    return {"phase": name, "rc": rc, "seconds": round(time.monotonic() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phases", nargs="*", default=["check", "served"], choices=sorted(PHASES))
    p.add_argument("--smoke", action="store_true", help="CPU and tiny shapes: the same steps, here")
    p.add_argument("--kit", type=Path, default=ROOT / ".gpu-kit")
    p.add_argument("--venv", type=Path, default=Path("/tmp/blip2-gpu-venv"), help="made anew: the kit goes here")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/blip2-gpu-out")))
    p.add_argument("--timeouts", default="check=330,served=420", help="seconds per phase, at most")
    p.add_argument("--deadline-s", type=float, default=560.0,
                   help="the whole session's limit: a device command gets 600 s, and what a phase leaves runs short")
    p.add_argument("--check-args", default="", help="more arguments for gpu_check.py (one string)")
    p.add_argument("--served-args", default="", help="more arguments for gpu_served.py (one string)")
    p.add_argument("--served-workdir", type=Path, default=None,
                   help="gpu_served's --workdir (its checkpoint and server logs); default /tmp/blip2-gpu-served, "
                        "with --smoke /tmp/blip2-gpu-session-smoke")
    args = p.parse_args(argv)
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    timeouts = {k: float(v) for k, v in (item.split("=") for item in args.timeouts.split(","))}
    workdir = args.served_workdir or Path("/tmp/blip2-gpu-session-smoke" if args.smoke else "/tmp/blip2-gpu-served")
    machine = (Path(sys.executable), environment(project_path=True))
    venv_error = None
    try:
        python, unpacked = make_venv(args.venv, args.kit)
        staged = (python, environment(project_path=False))
    except (OSError, subprocess.SubprocessError) as e:
        # The in-process phase still runs on the machine's own packages; the served one cannot start without the kit.
        venv_error = f"{type(e).__name__}: {e}"
        staged, unpacked = machine, []
    # Isolated, as the stubs run: what it imports is what the stages will.
    preflight = subprocess.run([str(staged[0]), "-I", "-c", PREFLIGHT], cwd=ROOT, env=staged[1], capture_output=True,
                               text=True, timeout=300)
    report: dict[str, Any] = {"kit": unpacked, "preflight_rc": preflight.returncode}
    if venv_error:
        report["venv_error"] = venv_error
    try:
        report.update(json.loads(preflight.stdout))
    except json.JSONDecodeError:
        report["preflight_error"] = (preflight.stdout + preflight.stderr)[-2000:]
    (args.out / "preflight.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2), flush=True)
    deadline = started + args.deadline_s
    for name in args.phases:
        script, smoke_args = PHASES[name]
        timeout_s = min(timeouts.get(name, 600.0), deadline - time.monotonic())
        if timeout_s < 30:
            print(json.dumps({"phase": name, "skipped": "the session's deadline"}), flush=True)
            continue
        extra = shlex.split(getattr(args, f"{name}_args"))
        # Each skips the figures that would start past its budget: a minute before its limit, to stop servers.
        extra = ["--budget-s", str(max(30.0, timeout_s - 60)), *extra]
        python, env = staged if name in KIT_PHASES else machine
        if name == "served":
            extra = ["--workdir", str(workdir), *extra]
            before = {log: log.stat().st_size for log in workdir.glob("*.log")}
        result = run_phase(python, name, script + (smoke_args if args.smoke else []) + extra, env, args.out, timeout_s)
        if name == "served":
            server_logs(workdir, before, args.out)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
