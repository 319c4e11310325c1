"""Metric names the deployment artefacts (dashboard, recording rules, HPA adapter) may query, shared by the
static checks (tests/unit/test_deploy_static.py) and the live one (tests/integration/test_deploy_metrics.py)."""

from __future__ import annotations

import re

# Triton 2.51 metric families the artefacts may use. GPU families only exist on a host with a GPU, so the
# integration test cannot see them on CI.
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count",
    "nv_inference_request_summary_us",
    "nv_inference_queue_summary_us",
    "nv_inference_compute_infer_summary_us",
    "nv_cpu_utilization",
    "nv_cpu_memory_used_bytes",
    "nv_cpu_memory_total_bytes",
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_power_usage",
}
GPU_ONLY_METRICS = {m for m in TRITON_METRICS if m.startswith("nv_gpu_")}
# Metric names, not label values such as model="blip2_llm".
METRIC_RE = re.compile(r"(?<![\"|])\b(?:nv|blip2)_[a-z0-9_]+\b")
# A metric with its label selector: (name, selector).
SELECTOR_RE = re.compile(f"({METRIC_RE.pattern})" + r"\{([^}]*)\}")
# NGC tag -> the Triton release inside it; the integration test checks the tested server reports it.
NGC_TRITON_VERSIONS = {"24.10": "2.51.0"}
