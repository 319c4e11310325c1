"""How CPU stage processes share the cores (`blip2_triton.compute_lock`): the cross-process lock that makes them
take turns (`compute_lock=on`), and the thread counts that split the cores when they overlap (the default)."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest

from blip2_triton.compute_lock import ComputeLock, available_cores, oversubscription, stage_threads
from blip2_triton.errors import ConfigurationError
from blip2_triton.options import ServerOptions


def _hold(path: str, started: mp.Event, release: mp.Event) -> None:
    with ComputeLock(Path(path)):
        started.set()
        release.wait(30)


def test_a_second_process_waits_for_the_holder(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path / "lock"), started, release))
    holder.start()
    try:
        assert started.wait(30)
        lock = ComputeLock(tmp_path / "lock")
        got = threading.Event()

        def take() -> None:
            with lock:
                got.set()

        taker = threading.Thread(target=take)
        taker.start()
        assert not got.wait(0.3), "the lock was taken while another process held it"
        release.set()
        assert got.wait(10)
        taker.join()
    finally:
        release.set()
        holder.join(10)


def test_threads_of_one_process_exclude_each_other_and_nesting_is_allowed(tmp_path: Path) -> None:
    lock = ComputeLock(tmp_path / "lock")
    inside = 0
    overlap = False

    def work() -> None:
        nonlocal inside, overlap
        for _ in range(50):
            with lock, lock:  # re-entrant on one thread (a static batch inside a step, ...)
                inside += 1
                overlap = overlap or inside > 1
                time.sleep(0.0005)
                inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap


def test_waiters_take_turns_with_a_tight_loop(tmp_path: Path) -> None:
    # The engine steps in a tight loop; without the entry lock it could re-take the lock before a waiter.
    looping, waiter = ComputeLock(tmp_path / "lock"), ComputeLock(tmp_path / "lock")
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            with looping:
                time.sleep(0.002)

    t = threading.Thread(target=loop)
    t.start()
    try:
        waits = []
        for _ in range(20):
            t0 = time.monotonic()
            with waiter:
                waits.append(time.monotonic() - t0)
        assert max(waits) < 1.0, f"starved: waited up to {max(waits):.3f} s"
    finally:
        stop.set()
        t.join()


def test_only_on_takes_turns(tmp_path: Path) -> None:
    path = str(tmp_path / "lock")
    assert not ComputeLock.for_stage("auto", path).enabled
    assert ComputeLock.for_stage("on", path).enabled
    assert not ComputeLock.for_stage("off", path).enabled
    with ComputeLock(None):  # disabled: a no-op context
        pass


def test_an_unusable_lock_file_disables_the_lock_instead_of_failing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    lock = ComputeLock.for_stage("on", str(blocker / "lock"))  # a path below a regular file
    assert not lock.enabled


def test_option_is_validated_and_read_from_the_environment() -> None:
    assert ServerOptions.resolve({}, env={}).compute_lock == "auto"
    assert ServerOptions.resolve({}, env={"BLIP2_COMPUTE_LOCK": "off"}).compute_lock == "off"
    with pytest.raises(ConfigurationError, match="compute_lock must be one of auto, on, off"):
        ServerOptions.resolve({"compute_lock": "sometimes"}, env={})


@pytest.mark.parametrize(
    ("options", "device", "env", "threads"),
    [
        ({}, "cpu", {}, 4),  # the default: the two stages split 8 cores
        ({"compute_lock": "off"}, "cpu", {}, 4),
        ({"cpu_stages": 4}, "cpu", {}, 2),  # FlanT5 beside OPT: four stage processes
        ({"compute_lock": "on"}, "cpu", {}, 8),  # taking turns, each on every usable core
        ({}, "cuda", {}, None),
        ({}, "cpu", {"OMP_NUM_THREADS": "3"}, None),  # the operator's own choice stands
        ({"cpu_threads": 6}, "cpu", {"OMP_NUM_THREADS": "3"}, 6),
        ({"cpu_threads": 2, "compute_lock": "on"}, "cuda", {}, 2),
    ],
)
def test_stage_threads(options: dict[str, object], device: str, env: dict[str, str], threads: int | None) -> None:
    assert stage_threads(ServerOptions(**options), device, cores=8, env=env) == threads  # type: ignore[arg-type]


def test_one_core_still_gets_a_thread() -> None:
    assert stage_threads(ServerOptions(cpu_stages=4), "cpu", cores=2, env={}) == 1


def test_threads_beyond_the_fair_share_are_reported() -> None:
    assert oversubscription(ServerOptions(), "cpu", 4, cores=8) is None
    assert oversubscription(ServerOptions(cpu_stages=4), "cpu", 1, cores=2) is None  # one each is the least
    assert oversubscription(ServerOptions(compute_lock="on"), "cpu", 8, cores=8) is None
    assert oversubscription(ServerOptions(), "cuda", 8, cores=8) is None
    message = oversubscription(ServerOptions(cpu_threads=8), "cpu", 8, cores=8)
    assert message is not None and "2 stage processes x 8 torch threads (BLIP2_CPU_THREADS=8) on 8 cores" in message


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "250000 100000"}, 2),  # 2.5 CPUs: 2 whole cores
        ({"cpu.max": "50000 100000"}, 1),
        ({"cpu.max": "max 100000"}, 8),
        ({"cpu.max": "100000 0"}, 8),  # a zero period is no limit, not a crash
        ({"cpu.max": ""}, 8),
        ({"cpu.max": "garbage"}, 8),
        ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 8),
        ({}, 8),
    ],
)
def test_a_cgroup_cpu_limit_caps_the_cores(tmp_path: Path, monkeypatch, files: dict[str, str], cores: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    assert available_cores(tmp_path / "cpu.max", tmp_path / "cpu") == cores


def test_cpu_threads_and_stages_options_are_validated() -> None:
    assert ServerOptions.resolve({}, env={"BLIP2_CPU_THREADS": "3"}).cpu_threads == 3
    assert ServerOptions.resolve({}, env={"BLIP2_CPU_STAGES": "4"}).cpu_stages == 4
    with pytest.raises(ConfigurationError, match=r"cpu_threads must be >= 0 \(0: automatic\), got -1"):
        ServerOptions.resolve({"cpu_threads": "-1"}, env={})
    with pytest.raises(ConfigurationError, match="cpu_stages must be >= 1"):
        ServerOptions.resolve({"cpu_stages": "0"}, env={})


def _server_env(shell: dict[str, str], *, with_t5: bool, extra: dict[str, str] | None = None,
                **settings: object) -> dict[str, str]:
    from blip2_triton.supervisor import LaunchSettings, TritonInstall, stage_environment

    install = TritonInstall(binary=Path("tritonserver"), backend_directory=None, env={})
    return stage_environment(LaunchSettings(with_t5=with_t5, env=extra or {}, **settings), install, shell)


@pytest.mark.parametrize(
    ("shell", "extra", "with_t5", "stages"),
    [
        ({}, None, True, ("4", "4")),  # OPT and FlanT5: four computing stage processes
        ({}, None, False, (None, None)),  # one family: the stages' own default (2)
        ({"BLIP2_CPU_STAGES": "6"}, None, True, ("6", "6")),  # one value serves both families
        ({"BLIP2_T5_CPU_STAGES": "5"}, None, True, ("5", "5")),
        ({"BLIP2_CPU_STAGES": ""}, None, True, ("4", "4")),  # empty counts as unset, as the options read it
        ({"BLIP2_CPU_STAGES": "6"}, {"BLIP2_CPU_STAGES": "8"}, True, ("8", "8")),  # the launcher's env wins
    ],
)
def test_the_launcher_tells_the_stages_how_many_share_the_cores(
        shell: dict[str, str], extra: dict[str, str] | None, with_t5: bool,
        stages: tuple[str | None, str | None]) -> None:
    env = _server_env(shell, with_t5=with_t5, extra=extra)
    assert (env.get("BLIP2_CPU_STAGES") or None, env.get("BLIP2_T5_CPU_STAGES") or None) == stages


@pytest.mark.parametrize(
    ("shell", "with_t5", "settings", "stages"),
    [
        ({}, False, {"with_itm": True}, "5"),  # OPT (vision, LLM) + retrieval (image, text, match)
        ({}, True, {"itm_model_id": "/ckpt"}, "7"),
        ({"BLIP2_ITM_CPU_STAGES": "3"}, False, {"with_itm": True}, "3"),  # one value serves every family
    ],
)
def test_retrieval_stages_share_the_cores_and_read_their_own_options(
        shell: dict[str, str], with_t5: bool, settings: dict[str, object], stages: str) -> None:
    env = _server_env(shell, with_t5=with_t5, options={"dtype": "float32"}, **settings)
    served = ["BLIP2_", *(["BLIP2_T5_"] if with_t5 else []), "BLIP2_ITM_"]
    assert {prefix: env.get(f"{prefix}CPU_STAGES") for prefix in served} == dict.fromkeys(served, stages)
    assert env["BLIP2_ITM_DTYPE"] == env["BLIP2_DTYPE"] == "float32"  # the launcher's options reach every family
    assert env.get("BLIP2_ITM_MODEL_ID") == settings.get("itm_model_id")
    assert "BLIP2_MODEL_ID" not in env, "the captioning checkpoint stays as the environment says"


def test_the_retrieval_repository_is_served_beside_the_captioning_one() -> None:
    from blip2_triton.supervisor import LaunchSettings

    assert [p.name for p in LaunchSettings().repositories()] == ["model_repository"]
    assert [p.name for p in LaunchSettings(with_itm=True, with_t5=True).repositories()] == [
        "model_repository", "model_repository_t5", "model_repository_itm"]
    # The container enables retrieval with the checkpoint's variable, which its stages read too.
    assert LaunchSettings.from_env({"BLIP2_ITM_MODEL_ID": "Salesforce/blip2-itm-vit-g"}).serves_itm
    assert LaunchSettings.from_env({"BLIP2_SERVE_ITM": "1"}).serves_itm
    assert not LaunchSettings.from_env({"BLIP2_SERVE_ITM": "0", "BLIP2_ITM_MODEL_ID": ""}).serves_itm


def test_taking_turns_stays_within_torchs_default_pool() -> None:
    # Affinity counts hyperthreads; torch's default counts physical cores.
    assert stage_threads(ServerOptions(compute_lock="on"), "cpu", cores=16, env={}, torch_default=8) == 8
    assert stage_threads(ServerOptions(compute_lock="on"), "cpu", cores=4, env={}, torch_default=8) == 4
    assert stage_threads(ServerOptions(compute_lock="on"), "cpu", cores=8, env={"OMP_NUM_THREADS": "2"}) is None
