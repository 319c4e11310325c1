"""The deployment's Triton setup, run for real: docker/entrypoint.sh starts `blip2-triton serve` on the
repository's model repository (tiny checkpoint) with its settings from the environment, as the container does.

A dedicated server rather than the session `triton_server` fixture because what is under test is the
container's path and flag set: latency summaries the dashboard reads, admin APIs closed on HTTP and gRPC. Every
metric the dashboard, the Prometheus rules and the HPA adapter rule use must be in its output, except the GPU
families, which a CPU-only host cannot produce.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from deploy_metrics import GPU_ONLY_METRICS, METRIC_RE, NGC_TRITON_VERSIONS, SELECTOR_RE
from tritonclient.utils import InferenceServerException

from blip2_triton.supervisor import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
ADMIN_HEADER = "triton-admin-key"
# Triton's gRPC frontend expects restricted-protocol headers under this prefix (docs/DEPLOY.md).
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
ADMIN_KEY = "integration-test-admin-key"


@dataclass(frozen=True)
class Deployed:
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def artefact_promql() -> dict[str, str]:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "blip2-triton.json").read_text())
    exprs = {f"dashboard:{p['title']}:{t['refId']}": t["expr"] for p in dashboard["panels"] for t in p["targets"]}
    rules = yaml.safe_load((DOCKER / "prometheus" / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            exprs[f"rules.yml:{rule.get('record') or rule.get('alert')}"] = rule["expr"]
    adapter = yaml.safe_load((ROOT / "deploy" / "k8s" / "monitoring" / "prometheus-adapter-config.yaml").read_text())
    for rule in yaml.safe_load(adapter["data"]["config.yaml"])["rules"]:
        exprs[f"hpa-adapter:{rule['name']['as']}"] = rule["seriesQuery"] + "\n" + rule["metricsQuery"]
    return exprs


def http_status(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0  # not listening yet


@pytest.fixture(scope="module")
def deployed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    work = tmp_path_factory.mktemp("deployed")
    server = Deployed(free_port(), free_port(), free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP2_", "TRITON_"))}
    env |= {
        # `blip2-triton` on PATH, as pip installs it in the image.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        # Loopback only: the container listens on all interfaces, a test must not.
        "TRITON_HOST": "127.0.0.1",
        "BLIP2_MODEL_REPOSITORY": str(ROOT / "model_repository"),
        "BLIP2_MODEL_ID": str(tiny_model_dir),
        "BLIP2_CACHE_DIR": str(work / "cache"),
        "TRITON_HTTP_PORT": str(server.http_port),
        "TRITON_GRPC_PORT": str(server.grpc_port),
        "TRITON_METRICS_PORT": str(server.metrics_port),
        "TRITON_ADMIN_KEY": ADMIN_KEY,
    }
    log_path = work / "tritonserver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", str(DOCKER / "entrypoint.sh")], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if http_status(f"{server.http_url}/v2/health/ready") == 200:
                break
            time.sleep(0.5)
        else:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
            pytest.fail(f"entrypoint.sh did not bring tritonserver up (exit {proc.poll()}):\n{tail}")
        yield server
    finally:
        # A drain and a graceful stop, as in a pod.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(timeout=60) == 0, log_path.read_text(errors="replace")[-3000:]
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def metrics_after_inference(deployed: Deployed, sample_images: dict[str, bytes]) -> str:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{deployed.http_port}")
    try:
        image = httpclient.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[sample_images["rgb_png_portrait"]]], dtype=np.object_))
        result = client.infer("blip2", [image])
        assert result.as_numpy("text_output").shape == (1, 1)
    finally:
        client.close()
    # Triton refreshes its metrics on an interval (2 s by default); wait until the request shows up.
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(deployed.metrics_url, timeout=10) as response:
            text = response.read().decode()
        if re.search(r'^nv_inference_request_success\{model="blip2",version="1"\} [1-9]', text, re.M):
            return text
        assert time.monotonic() < deadline, "the inference never appeared in nv_inference_request_success"
        time.sleep(0.5)


def exported(text: str) -> dict[str, set[str]]:
    """Metric family -> the model label values it carries ("" for unlabelled series)."""
    families: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s", line)
        if match and not line.startswith("#"):
            model = re.search(r'model="([^"]*)"', match.group(2) or "")
            families.setdefault(match.group(1), set()).add(model.group(1) if model else "")
    return families


def test_metrics_used_by_dashboard_rules_and_hpa_exist(metrics_after_inference: str) -> None:
    families = exported(metrics_after_inference)
    missing: dict[str, set[str]] = {}
    for where, expr in artefact_promql().items():
        absent = set(METRIC_RE.findall(expr)) - GPU_ONLY_METRICS - set(families)
        if absent:
            missing[where] = absent
    assert not missing, f"metrics the deployment queries but Triton does not export: {missing}"
    # Each model a query selects must have series, or the query is silently empty.
    for where, expr in artefact_promql().items():
        for metric, selector in SELECTOR_RE.findall(expr):
            if metric in GPU_ONLY_METRICS:
                continue
            wanted = set(re.findall(r'model="([^"]+)"', selector))
            for alternation in re.findall(r'model=~"([^"]+)"', selector):
                wanted |= set(alternation.split("|"))
            assert wanted <= families[metric], f"{where}: {metric} has no series for {wanted - families[metric]}"


def test_stage_counters_move_for_the_hpa_rule(metrics_after_inference: str) -> None:
    values = {
        (m.group(1), m.group(2)): float(m.group(3))
        for m in re.finditer(
            r'^(nv_inference_\w+)\{model="([^"]+)",version="1"\} ([0-9.e+]+)$', metrics_after_inference, re.M
        )
    }
    for stage in ("blip2_vision", "blip2_llm"):
        assert values[("nv_inference_exec_count", stage)] >= 1
        assert values[("nv_inference_compute_infer_duration_us", stage)] > 0
        assert ("nv_inference_queue_duration_us", stage) in values
    assert values[("nv_inference_request_success", "blip2")] >= 1
    assert re.search(
        r'^nv_inference_request_summary_us\{model="blip2",version="1",quantile="0.99"\} ', metrics_after_inference, re.M
    ), "p99 needs --metrics-config=summary_latencies=true"


def test_probe_endpoints_and_server_version(deployed: Deployed) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/blip2/ready"):
        assert http_status(deployed.http_url + path) == 200, path
    with urllib.request.urlopen(f"{deployed.http_url}/v2", timeout=10) as response:
        version = json.loads(response.read())["version"]
    tag = re.search(
        r"^ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:(\S+)-py3$", (DOCKER / "Dockerfile").read_text(), re.M
    )
    assert tag, "Dockerfile base image changed shape"
    assert version == NGC_TRITON_VERSIONS[tag.group(1)], "tests ran on a different Triton than the image ships"


def test_admin_apis_closed_over_http(deployed: Deployed) -> None:
    base = deployed.http_url
    closed = [
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/blip2/load"),
        ("POST", "/v2/repository/models/blip2/unload"),
        ("GET", "/v2/systemsharedmemory/status"),
        ("POST", "/v2/systemsharedmemory/region/x/unregister"),
        ("GET", "/v2/cudasharedmemory/status"),
        ("GET", "/v2/trace/setting"),
        ("GET", "/v2/logging"),
    ]
    for method, path in closed:
        assert http_status(base + path, method) == 403, f"{method} {path} open without the key"
        assert http_status(base + path, method, {ADMIN_HEADER: "wrong"}) == 403, f"{method} {path} wrong key"
    # The operator key opens them (read-only calls only: nothing here may unload the model).
    assert http_status(base + "/v2/repository/index", "POST", {ADMIN_HEADER: ADMIN_KEY}) == 200
    assert http_status(base + "/v2/systemsharedmemory/status", "GET", {ADMIN_HEADER: ADMIN_KEY}) == 200
    # Inference callers keep metadata, config and statistics.
    for path in ("/v2", "/v2/models/blip2", "/v2/models/blip2/config", "/v2/models/blip2/stats"):
        assert http_status(base + path) == 200, path


def test_admin_apis_closed_over_grpc(deployed: Deployed) -> None:
    client = grpcclient.InferenceServerClient(deployed.grpc_url)
    try:
        assert client.is_server_ready()
        for call in (
            client.get_model_repository_index,
            client.get_system_shared_memory_status,
            client.get_cuda_shared_memory_status,
            client.get_trace_settings,
            client.get_log_settings,
        ):
            with pytest.raises(InferenceServerException, match=ADMIN_HEADER):
                call()
        with pytest.raises(InferenceServerException, match=ADMIN_HEADER):
            client.unload_model("blip2")
        with pytest.raises(InferenceServerException, match=ADMIN_HEADER):
            client.get_model_repository_index(headers={ADMIN_HEADER: ADMIN_KEY})
        index = client.get_model_repository_index(headers={GRPC_ADMIN_HEADER: ADMIN_KEY}, as_json=True)
        assert {m["name"] for m in index["models"]} == {
            "blip2", "blip2_vision", "blip2_llm", "blip2_stream"
        }
        assert client.is_model_ready("blip2")
    finally:
        client.close()
