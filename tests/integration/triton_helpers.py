from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from blip2_triton.options import ServerOptions
from blip2_triton.supervisor import LaunchSettings, TritonServer

STAGE_OPTIONS = {f.name for f in fields(ServerOptions)} - {"model_id"}
ROOT = Path(__file__).resolve().parents[2]

DTYPES = {
    "max_tokens": ("INT32", np.int32),
    "temperature": ("FP32", np.float32),
    "top_p": ("FP32", np.float32),
    "top_k": ("INT32", np.int32),
    "beam_width": ("INT32", np.int32),
    "repetition_penalty": ("FP32", np.float32),
    "seed": ("UINT64", np.uint64),
}


def build_inputs(module: Any, image: bytes, prompt: str | bytes | None = None, **controls: Any) -> list[Any]:
    """One request's input tensors. A bytes prompt is sent as is; a str one as UTF-8, lone surrogates kept
    (surrogatepass), so tests can send invalid UTF-8 either way."""
    inputs = []
    tensor = module.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
    inputs.append(tensor)
    if prompt is not None:
        tensor = module.InferInput("text_input", [1, 1], "BYTES")
        raw = prompt.encode("utf-8", errors="surrogatepass") if isinstance(prompt, str) else prompt
        tensor.set_data_from_numpy(np.array([[raw]], dtype=np.object_))
        inputs.append(tensor)
    for name, value in controls.items():
        triton_type, np_type = DTYPES[name]
        tensor = module.InferInput(name, [1, 1], triton_type)
        tensor.set_data_from_numpy(np.array([[value]], dtype=np_type))
        inputs.append(tensor)
    return inputs


def infer(client: Any, image: bytes, prompt: str | None = None, *, model: str = "blip2", **controls: Any) -> str:
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    result = client.infer(model, build_inputs(module, image, prompt, **controls))
    return result.as_numpy("text_output")[0, 0].decode("utf-8")


class Clients:
    """One client per thread: tritonclient's HTTP client (geventhttpclient) must not cross threads."""

    def __init__(self, protocol: str, server: Any) -> None:
        self.protocol = protocol
        self.server = server
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def get(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = grpcclient.InferenceServerClient(self.server.grpc_url)
            else:
                client = httpclient.InferenceServerClient(self.server.http_hostport, network_timeout=120)
            self._local.client = client
            with self._lock:
                self._all.append(client)
        return client

    def infer(self, image: bytes, prompt: str | None = None, *, model: str = "blip2", **controls: Any) -> str:
        return infer(self.get(), image, prompt, model=model, **controls)

    def close(self) -> None:
        for client in self._all:
            client.close()


def model_stats(http_hostport: str, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of a model's version 1."""
    client = httpclient.InferenceServerClient(http_hostport)
    stats = client.get_inference_statistics(model)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def front_settings(server: Any, **overrides: Any) -> Any:  # -> FrontSettings
    """Settings of an in-process front before `server`, on free loopback ports; `overrides` are FrontSettings fields."""
    from blip2_triton.front import FrontSettings

    values: dict[str, Any] = dict(triton_http=server.http_hostport, triton_grpc=server.grpc_url, host="127.0.0.1",
                                  http_port=0, grpc_port=0, metrics_port=0)
    values.update(overrides)
    return FrontSettings.from_env({}, **values)


def start_server(log_dir: Path, name: str, **settings: Any) -> TritonServer:
    """A started server on free ports with short timeouts; `settings` are LaunchSettings fields or stage options."""
    options = {key: str(settings.pop(key)) for key in list(settings) if key in STAGE_OPTIONS}
    launch = LaunchSettings.on_free_ports(startup_timeout_s=300, exit_timeout_s=10, options=options, **settings)
    return TritonServer(launch, log_path=log_dir / f"{name}.log").start()


def engine_counts(server: Any, llm_model: str) -> tuple[float, float]:
    """(sequences, forward passes) of an LLM stage's engine, from its metrics."""
    import re
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()

    def value(name: str) -> float:
        match = re.search(rf'^{name}\{{[^}}]*model="{llm_model}"[^}}]*\}} (\S+)$', text, re.M)
        assert match, f"{name} for {llm_model} not exported"
        return float(match.group(1))

    return value("blip2_engine_step_sequences_total"), value("blip2_engine_steps_total")


def tritonserver_children(pid: int) -> list[int]:
    """Pids of the live (not zombie) tritonserver processes whose parent is `pid`."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if child.name() == "tritonserver" and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def cancelled_requests(server: Any, llm_model: str = "blip2_llm") -> float:
    """Requests an LLM stage's engine saw cancelled (`blip2_requests_cancelled_total`), from its metrics."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # `loadtest` is a plain directory of the checkout, not an installed package
    from loadtest import prom

    samples = prom.scrape(server.metrics_url, timeout=10)
    return prom.by_model(samples, "blip2_requests_cancelled_total").get(llm_model, 0.0)


def run_locust(out_dir: Path, args: list[str], *, timeout_s: float) -> dict[str, Any]:
    """A headless Locust run of the project's locustfile with `args` (host, load shape, user classes); its run data
    (per-request samples, errors) after checking that no request failed and Locust exited 0."""
    run_data = out_dir / "run.json"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
           "--only-summary", "--loglevel", "WARNING", "--run-data", str(run_data), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    run = json.loads(run_data.read_text())
    failed = [row for row in run["samples"] if not row[2]]
    assert not failed and not run["errors"], run["errors"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run
