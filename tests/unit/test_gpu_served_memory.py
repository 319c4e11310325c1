"""`bench/gpu_served.py`'s GPU memory per stage process, read from nvidia-smi (a stand-in script here)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest


class _Server:
    def __init__(self, stubs: dict[str, int]) -> None:
        self.stubs = stubs

    def stub_pids(self) -> dict[str, int]:
        return self.stubs


@pytest.fixture
def nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def listing(rows: list[tuple[int, int]]) -> None:
        script = tmp_path / "nvidia-smi"
        lines = "".join(f"echo '{pid}, {mib}'\n" for pid, mib in rows)
        script.write_text(f"#!/bin/sh\n{lines}")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    return listing


def test_each_stage_process_by_its_pid(import_bench, nvidia_smi) -> None:
    gpu_served = import_bench("gpu_served")
    nvidia_smi([(101, 9000), (102, 16000), (os.getpid(), 20000)])
    assert gpu_served.gpu_memory_mib(_Server({"vision_0": 101, "llm_0": 102})) == {"vision_0": 9000,
                                                                                   "llm_0": 16000}


def test_pids_of_another_namespace_are_reported_unattributed(import_bench, nvidia_smi) -> None:
    # In a container nvidia-smi shows the host's pids: the figures must not vanish.
    gpu_served = import_bench("gpu_served")
    nvidia_smi([(40101, 9000), (40102, 16000)])
    assert gpu_served.gpu_memory_mib(_Server({"vision_0": 101, "llm_0": 102})) == {
        "unattributed": {"40101": 9000, "40102": 16000}}
