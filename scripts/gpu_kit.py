"""Builds `.gpu-kit/`: what the lent GPU machine lacks for the served benchmark, small enough to carry (64 MiB).

    .venv/bin/python scripts/gpu_kit.py                  # for the GPU machine's Python 3.12
    .venv/bin/python scripts/gpu_kit.py --python 3.11    # for a smoke test of bench/gpu_session.py here

The GPU machine has torch, transformers, grpcio and numpy 2 but no network. It needs:
  pytriton.tar.xz      nvidia-pytriton 0.7.0's tritonserver, Python backend and the stub of one Python version
                       (the wheel is 53 MiB; the other versions' stubs and the bundled libpython 3.13, which only the
                       3.13 stub links, are left out)
  numpy.tar.xz         numpy 1.26: the 2.51 stub dies on its first request with numpy 2 (see supervisor/install.py)
  tritonclient.tar.xz  tritonclient's Python gRPC client and utils, without perf_analyzer's binaries
  bitsandbytes.tar.xz  bitsandbytes 0.50 for 8-bit and 4-bit loading, with the library of one CUDA version only
Each unpacks into the site-packages of the virtual environment bench/gpu_session.py makes for the phases.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY_LIMIT_BYTES = 64 * 2**20  # the working tree and what is carried, together

WHEELS = {
    "pytriton": "nvidia-pytriton==0.7.0",
    "numpy": "numpy==1.26.4",
    "tritonclient": "tritonclient==2.51.0",
    "bitsandbytes": "bitsandbytes==0.50.2",
}


def _download(spec: str, python: str, dest: Path) -> Path:
    platforms = ("manylinux_2_35_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                 "manylinux1_x86_64")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, *(arg for p in platforms for arg in ("--platform", p)),
                    "-d", str(dest), spec], check=True)
    name = spec.split("==")[0].replace("-", "_")
    (wheel,) = dest.glob(f"{name}-*.whl")
    return wheel


def _keep(kind: str, name: str, python: str, cuda: str) -> bool:
    if kind == "pytriton":
        if "/python_backend_stubs/" in name:
            return f"/python_backend_stubs/{python}/" in name
        return not fnmatch.fnmatch(name, "nvidia_pytriton.libs/libpython3-*") and ".dist-info/" not in name
    if kind == "tritonclient":
        # The purelib tree holds the package; the data scripts are perf_analyzer's binaries.
        return "/purelib/tritonclient/" in name and "/http/" not in name
    if kind == "bitsandbytes" and fnmatch.fnmatch(name, "bitsandbytes/libbitsandbytes_*.so"):
        return name.endswith((f"_cuda{cuda}.so", "_cpu.so"))
    return True


def _target(kind: str, name: str) -> str:
    return name.split("/purelib/", 1)[1] if kind == "tritonclient" else name


def pack(kind: str, wheel: Path, python: str, cuda: str, out: Path) -> int:
    buffer = io.BytesIO()
    with zipfile.ZipFile(wheel) as zf, tarfile.open(fileobj=buffer, mode="w:xz", preset=9) as tar:
        for info in zf.infolist():
            if info.is_dir() or not _keep(kind, info.filename, python, cuda):
                continue
            data = zf.read(info)
            member = tarfile.TarInfo(_target(kind, info.filename))
            member.size = len(data)
            # Wheels keep Unix modes in the high bits; tritonserver and the stub must stay executable.
            member.mode = (info.external_attr >> 16) & 0o777 or 0o644
            tar.addfile(member, io.BytesIO(data))
    (out / f"{kind}.tar.xz").write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default="3.12", help="the GPU machine's Python version (its stub and numpy)")
    p.add_argument("--cuda", default="130", help="the CUDA version of the GPU machine's torch (bitsandbytes' library)")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu-kit")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for kind, spec in WHEELS.items():
            size = pack(kind, _download(spec, args.python, Path(tmp)), args.python, args.cuda, args.out)
            total += size
            print(f"{kind}: {size / 2**20:.1f} MiB")
    (args.out / "PYTHON").write_text(args.python + "\n")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = [ROOT / name for name in tracked.decode().split("\0") if name]
    tree = sum(path.stat().st_size for path in paths if path.is_file())
    # A margin of 2 MiB for the uncommitted files that travel with the tree.
    room = CARRY_LIMIT_BYTES - tree - 2 * 2**20
    print(f"{args.out}: {total / 2**20:.1f} MiB; the working tree {tree / 2**20:.1f} MiB; room {room / 2**20:.1f} MiB")
    if total > room:
        print("too large to carry beside the working tree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
