"""Capacity report from a Locust run's data file: per-step client figures plus Triton's server-side view.

    python -m loadtest.report loadtest/reports/x/run.json [--out DIR] [--slo-ms 2000 --slo-percentile 95]

Column names follow perf_analyzer / genai-perf so figures can be compared side by side.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import gzip
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtest import prom

REPORT_FORMAT = "blip2-capacity-report/1"
DEFAULT_STAGE_MODELS = ("blip2_vision", "blip2_llm")
PERCENTILES = (50, 90, 95, 99)

# Report column suffix -> cumulative Triton counter that is divided by Δ successful requests of the same model.
PER_REQUEST_COUNTERS = {
    "server_request_us": "nv_inference_request_duration_us",
    "server_queue_us": "nv_inference_queue_duration_us",
    "server_compute_input_us": "nv_inference_compute_input_duration_us",
    "server_compute_infer_us": "nv_inference_compute_infer_duration_us",
    "server_compute_output_us": "nv_inference_compute_output_duration_us",
}
SUCCESS = "nv_inference_request_success"
FAILURE = "nv_inference_request_failure"
INFERENCES = "nv_inference_count"
EXECUTIONS = "nv_inference_exec_count"

# The server's own counters (per `model` label): the in-flight LLM engine, whose generation happens after the
# decoupled model's execute() returns and so is invisible to Triton's compute counters, and the vision stage's
# embedding cache.
ENGINE_TOKENS = "blip2_generated_tokens_total"
ENGINE_STEPS = "blip2_engine_steps_total"
ENGINE_STEP_SEQUENCES = "blip2_engine_step_sequences_total"
ENGINE_TTFT_US = "blip2_time_to_first_token_us_total"
ENGINE_FIRST_TOKENS = "blip2_first_tokens_total"
ENGINE_CANCELLED = "blip2_requests_cancelled_total"
ENGINE_ACTIVE = "blip2_active_sequences"
CACHE_HITS = "blip2_embedding_cache_hits_total"
CACHE_MISSES = "blip2_embedding_cache_misses_total"
CACHE_ENTRIES = "blip2_embedding_cache_entries"
CUSTOM_COUNTERS = (ENGINE_TOKENS, ENGINE_STEPS, ENGINE_STEP_SEQUENCES, ENGINE_TTFT_US, ENGINE_FIRST_TOKENS,
                   ENGINE_CANCELLED, CACHE_HITS, CACHE_MISSES)  # fmt: skip
CUSTOM_GAUGES = (ENGINE_ACTIVE, CACHE_ENTRIES)

# Top-level server columns summed over the composing (stage) models, as perf_analyzer does for ensembles.
STAGE_SUM_COLUMNS = (
    "server_queue_us",
    "server_compute_input_us",
    "server_compute_infer_us",
    "server_compute_output_us",
)

CLIENT_COLUMNS = [
    "step",
    "concurrency",
    "users_running",
    "start_s",
    "duration_s",
    "request_count",
    "success_count",
    "failure_count",
    "failure_rate",
    "throughput_infer_per_sec",
    "avg_latency_ms",
    "min_latency_ms",
    *[f"p{p}_latency_ms" for p in PERCENTILES],
    "max_latency_ms",
]
SERVER_COLUMNS = [
    "server_request_us",
    *STAGE_SUM_COLUMNS,
    "server_failure_count",
    "output_token_throughput_per_sec",
    "server_time_to_first_token_ms",
]
MODEL_COLUMNS = [
    "request_success",
    "request_failure",
    "throughput_infer_per_sec",
    "inference_count",
    "execution_count",
    "avg_batch_size",
    *PER_REQUEST_COUNTERS,
]
GPU_COLUMNS = ["gpu_utilization", "gpu_memory_used_bytes"]


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile: always an observed latency, never an interpolation between two."""
    if not values:
        return None
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    ordered = sorted(values)
    rank = math.ceil(p / 100.0 * len(ordered))
    return float(ordered[max(rank, 1) - 1])


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    summary: dict[str, float | None] = {
        "avg_latency_ms": sum(latencies_ms) / len(latencies_ms) if latencies_ms else None,
        "min_latency_ms": min(latencies_ms) if latencies_ms else None,
        "max_latency_ms": max(latencies_ms) if latencies_ms else None,
    }
    for p in PERCENTILES:
        summary[f"p{p}_latency_ms"] = percentile(latencies_ms, p)
    return summary


def counter_delta(start: Mapping[str, float], end: Mapping[str, float], key: str) -> float | None:
    """Δ of a cumulative counter; None when either side is missing or it went backwards (server restarted)."""
    if key not in start or key not in end:
        return None
    delta = end[key] - start[key]
    return delta if delta >= 0 else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def avg_batch_size(
    start: Mapping[str, Mapping[str, float]], end: Mapping[str, Mapping[str, float]], model: str
) -> float | None:
    """Δnv_inference_count / Δnv_inference_exec_count: requests (batch rows) per model execution."""
    return _ratio(
        counter_delta(start.get(INFERENCES, {}), end.get(INFERENCES, {}), model),
        counter_delta(start.get(EXECUTIONS, {}), end.get(EXECUTIONS, {}), model),
    )


def counters_by_model(samples: Iterable[prom.Sample]) -> dict[str, dict[str, float]]:
    samples = list(samples)
    names = {SUCCESS, FAILURE, INFERENCES, EXECUTIONS, *PER_REQUEST_COUNTERS.values(), *CUSTOM_COUNTERS,
             *CUSTOM_GAUGES}  # fmt: skip
    return {name: prom.by_model(samples, name) for name in names}


def custom_model_stats(
    start: Mapping[str, Mapping[str, float]], end: Mapping[str, Mapping[str, float]], model: str, duration_s: float
) -> dict[str, float | None]:
    """Engine and cache figures; only the keys whose metric families this model exports."""

    def delta(name: str) -> float | None:
        return counter_delta(start.get(name, {}), end.get(name, {}), model)

    stats: dict[str, float | None] = {}
    if model in end.get(ENGINE_STEPS, {}):
        tokens, first_tokens = delta(ENGINE_TOKENS), delta(ENGINE_FIRST_TOKENS)
        ttft_us = _ratio(delta(ENGINE_TTFT_US), first_tokens)
        stats.update(
            {
                # Sequences per forward pass: the batch the in-flight engine really ran, whatever Triton batched.
                "engine_avg_batch_size": _ratio(delta(ENGINE_STEP_SEQUENCES), delta(ENGINE_STEPS)),
                "output_token_throughput_per_sec": _ratio(tokens, duration_s),
                "avg_output_tokens": _ratio(tokens, first_tokens),
                "time_to_first_token_ms": ttft_us / 1000.0 if ttft_us is not None else None,
                "active_sequences": end.get(ENGINE_ACTIVE, {}).get(model),
                "requests_cancelled": delta(ENGINE_CANCELLED),
            }
        )
    if model in end.get(CACHE_HITS, {}):
        hits, misses = delta(CACHE_HITS), delta(CACHE_MISSES)
        lookups = hits + misses if hits is not None and misses is not None else None
        stats["cache_hit_rate"] = _ratio(hits, lookups)
        stats["cache_entries"] = end.get(CACHE_ENTRIES, {}).get(model)
    return stats


def server_model_stats(
    start: Mapping[str, Mapping[str, float]], end: Mapping[str, Mapping[str, float]], model: str, duration_s: float
) -> dict[str, float | None]:
    def delta(name: str) -> float | None:
        return counter_delta(start.get(name, {}), end.get(name, {}), model)

    success = delta(SUCCESS)
    stats: dict[str, float | None] = {
        "request_success": success,
        "request_failure": delta(FAILURE),
        "throughput_infer_per_sec": _ratio(success, duration_s),
        "inference_count": delta(INFERENCES),
        "execution_count": delta(EXECUTIONS),
        "avg_batch_size": avg_batch_size(start, end, model),
    }
    for column, counter in PER_REQUEST_COUNTERS.items():
        stats[column] = _ratio(delta(counter), success)
    return stats


def _gpu_figures(samples: Iterable[prom.Sample]) -> dict[str, float | None]:
    # Gauges, read at the window end; averaged over GPUs so one column describes the replica.
    figures: dict[str, float | None] = {}
    samples = list(samples)
    for column, name in (
        ("gpu_utilization", "nv_gpu_utilization"),
        ("gpu_memory_used_bytes", "nv_gpu_memory_used_bytes"),
    ):
        values = [s.value for s in samples if s.name == name and math.isfinite(s.value)]
        figures[column] = sum(values) / len(values) if values else None
    return figures


def _snapshot_samples(snapshot: Mapping[str, Any] | None) -> list[prom.Sample] | None:
    if not snapshot or "samples" not in snapshot:
        return None
    return [prom.Sample.from_json(item) for item in snapshot["samples"]]


def _window_samples(samples: Sequence[Sequence[Any]], times: Sequence[float], start: float, end: float) -> list:
    return list(samples[bisect.bisect_left(times, start) : bisect.bisect_left(times, end)])


def window_row(
    window: Mapping[str, Any],
    samples: Sequence[Sequence[Any]],
    times: Sequence[float],
    run_start: float,
    model: str,
    stage_models: Sequence[str],
) -> dict[str, Any]:
    start, end = float(window["start"]), float(window["end"])
    duration = max(end - start, 1e-9)
    rows = _window_samples(samples, times, start, end)
    ok_latencies = [float(r[1]) for r in rows if r[2]]
    failures = sum(1 for r in rows if not r[2])
    row: dict[str, Any] = {
        "step": window["index"],
        "concurrency": window["users"],
        "users_running": window.get("users_running"),
        "start_s": round(start - run_start, 3),
        "duration_s": round(duration, 3),
        "request_count": len(rows),
        "success_count": len(ok_latencies),
        "failure_count": failures,
        "failure_rate": failures / len(rows) if rows else 0.0,
        # Like perf_analyzer, throughput and latency count successful requests only.
        "throughput_infer_per_sec": len(ok_latencies) / duration,
        **latency_summary(ok_latencies),
    }
    start_samples = _snapshot_samples(window.get("metrics_start"))
    end_samples = _snapshot_samples(window.get("metrics_end"))
    models = [model, *[m for m in stage_models if m != model]]
    if start_samples is None or end_samples is None:
        row.update(dict.fromkeys(SERVER_COLUMNS))
        for m in models:
            row.update({f"{m}_{c}": None for c in MODEL_COLUMNS})
        row.update(dict.fromkeys(GPU_COLUMNS))
        return row
    start_counters, end_counters = counters_by_model(start_samples), counters_by_model(end_samples)
    per_model = {m: server_model_stats(start_counters, end_counters, m, duration) for m in models}
    row["server_request_us"] = per_model[model]["server_request_us"]
    stages = [m for m in models if m != model] or [model]
    for column in STAGE_SUM_COLUMNS:
        values = [per_model[m][column] for m in stages]
        row[column] = sum(v for v in values if v is not None) if any(v is not None for v in values) else None
    failures_server = [per_model[m]["request_failure"] for m in models]
    row["server_failure_count"] = sum(v for v in failures_server if v is not None)
    custom = {m: custom_model_stats(start_counters, end_counters, m, duration) for m in models}
    token_rates = [
        c["output_token_throughput_per_sec"]
        for c in custom.values()
        if c.get("output_token_throughput_per_sec") is not None
    ]
    row["output_token_throughput_per_sec"] = sum(token_rates) if token_rates else None
    ttfts = [c["time_to_first_token_ms"] for c in custom.values() if c.get("time_to_first_token_ms") is not None]
    row["server_time_to_first_token_ms"] = ttfts[0] if len(ttfts) == 1 else None
    for m in models:
        row.update({f"{m}_{c}": v for c, v in per_model[m].items()})
        row.update({f"{m}_{c}": v for c, v in custom[m].items()})
    row.update(_gpu_figures(end_samples))
    return row


def by_request_rows(
    window: Mapping[str, Any], samples: Sequence[Sequence[Any]], times: Sequence[float]
) -> list[dict[str, Any]]:
    start, end = float(window["start"]), float(window["end"])
    duration = max(end - start, 1e-9)
    groups: dict[tuple[str, str], list[Sequence[Any]]] = {}
    for r in _window_samples(samples, times, start, end):
        groups.setdefault((r[3], r[4]), []).append(r)
    rows = []
    for (request_type, name), items in sorted(groups.items()):
        ok = [float(r[1]) for r in items if r[2]]
        rows.append(
            {
                "step": window["index"],
                "concurrency": window["users"],
                "request_type": request_type,
                "name": name,
                "request_count": len(items),
                "failure_count": len(items) - len(ok),
                "throughput_infer_per_sec": len(ok) / duration,
                **latency_summary(ok),
            }
        )
    return rows


def summarize(rows: Sequence[Mapping[str, Any]], slo_ms: float | None, slo_percentile: int) -> dict[str, Any]:
    if not rows:
        return {}
    best = max(rows, key=lambda r: r["throughput_infer_per_sec"])
    peak = best["throughput_infer_per_sec"]
    # Saturation: the lowest load already within 10% of the peak; more users beyond it only add queueing.
    saturated = min((r for r in rows if r["throughput_infer_per_sec"] >= 0.9 * peak), key=lambda r: r["concurrency"])
    summary: dict[str, Any] = {
        "max_throughput_infer_per_sec": peak,
        "max_throughput_concurrency": best["concurrency"],
        "saturation_concurrency": saturated["concurrency"],
        "total_requests": sum(r["request_count"] for r in rows),
        "total_failures": sum(r["failure_count"] for r in rows),
    }
    if slo_ms is not None:
        column = f"p{slo_percentile}_latency_ms"
        within = [r for r in rows if r.get(column) is not None and r[column] <= slo_ms and r["failure_count"] == 0]
        top = max(within, key=lambda r: r["throughput_infer_per_sec"]) if within else None
        summary["slo"] = {
            "latency_ms": slo_ms,
            "percentile": slo_percentile,
            "throughput_infer_per_sec": top["throughput_infer_per_sec"] if top else None,
            "concurrency": top["concurrency"] if top else None,
        }
    return summary


def _models_in_metrics(windows: Iterable[Mapping[str, Any]]) -> set[str]:
    models: set[str] = set()
    for window in windows:
        samples = _snapshot_samples(window.get("metrics_end")) or []
        models.update(prom.by_model(samples, SUCCESS))
    return models


def build_report(run: Mapping[str, Any], slo_ms: float | None = None, slo_percentile: int = 95) -> dict[str, Any]:
    if run.get("format") != "blip2-loadtest-run/1":
        raise ValueError(f"not a load-test run file (format={run.get('format')!r})")
    config = run.get("config", {})
    model = config.get("model", "blip2")
    windows = [w for w in run.get("windows", []) if w.get("end") is not None]
    stage_models = [m for m in config.get("stage_models", DEFAULT_STAGE_MODELS) if m != model]
    served = _models_in_metrics(windows)
    if served:
        # A server without one of the default stages (older repository, other pipeline) gets no empty columns.
        stage_models = [m for m in stage_models if m in served]
    samples = sorted(run.get("samples", []), key=lambda r: r[0])
    times = [float(r[0]) for r in samples]
    run_start = float(run.get("started_at") or (windows[0]["start"] if windows else 0.0))
    steps = [window_row(w, samples, times, run_start, model, stage_models) for w in windows]
    by_request = [row for w in windows for row in by_request_rows(w, samples, times)]
    scrape_errors = [
        snap["error"]
        for w in windows
        for snap in (w.get("metrics_start"), w.get("metrics_end"))
        if snap and "error" in snap
    ]
    return {
        "format": REPORT_FORMAT,
        "config": config,
        "models": [model, *stage_models],
        "summary": summarize(steps, slo_ms, slo_percentile),
        "steps": steps,
        "by_request": by_request,
        "errors": dict(sorted(run.get("errors", {}).items(), key=lambda kv: -kv[1])[:20]),
        "metrics_scrape_errors": scrape_errors[:5],
    }


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.0f}"
    return value


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_value(row.get(c)) for c in columns})


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        # Four decimals is below any meaningful resolution here (µs, ms, infer/s) and keeps the file readable.
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless CI and servers have no display
    import matplotlib.pyplot as plt

    return plt


def _load_axis(steps: Sequence[Mapping[str, Any]]) -> tuple[list[float], str]:
    # A soak holds one concurrency, so elapsed time is the only axis that separates its rows.
    if len({s["concurrency"] for s in steps}) > 1:
        return [s["concurrency"] for s in steps], "concurrency (users)"
    return [s["start_s"] / 60.0 for s in steps], f"elapsed minutes (concurrency {steps[0]['concurrency']})"


def plot_latency_vs_throughput(steps: Sequence[Mapping[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, (ax, ax_load) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    x = [s["throughput_infer_per_sec"] for s in steps]
    for p, style in zip(PERCENTILES, ("o-", "s--", "^-.", "v:"), strict=True):
        y = [s[f"p{p}_latency_ms"] for s in steps]
        pts = [(a, b) for a, b in zip(x, y, strict=True) if b is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=f"p{p}")
    for s in steps:
        if s["p50_latency_ms"] is not None:
            ax.annotate(
                f"c={s['concurrency']}",
                (s["throughput_infer_per_sec"], s["p50_latency_ms"]),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
            )
    ax.set_xlabel("throughput (infer/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency vs throughput (one point per step)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    # Throughput against load on its own axis: the knee is where this curve flattens.
    load, xlabel = _load_axis(steps)
    ax_load.plot(load, x, "o-", color="tab:green")
    ax_load.set_xlabel(xlabel)
    ax_load.set_ylabel("throughput (infer/s)")
    ax_load.set_title("Throughput vs load")
    ax_load.set_ylim(bottom=0)
    ax_load.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_batch_size_vs_load(steps: Sequence[Mapping[str, Any]], stage_models: Sequence[str], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    x, xlabel = _load_axis(steps)
    plotted = False
    for model, style in zip(stage_models, ("o-", "s-", "^-", "v-", "D-"), strict=False):
        pts = [
            (a, s[f"{model}_avg_batch_size"])
            for a, s in zip(x, steps, strict=True)
            if s.get(f"{model}_avg_batch_size") is not None
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=f"{model} (Triton batches)")
            plotted = True
        engine = [(a, s[f"{model}_engine_avg_batch_size"]) for a, s in zip(x, steps, strict=True)
                  if s.get(f"{model}_engine_avg_batch_size") is not None]  # fmt: skip
        if engine:
            ax.plot(*zip(*engine, strict=True), style[0] + "--", label=f"{model} (in-flight engine)")
            plotted = True
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    if not plotted:
        ax.text(0.5, 0.5, "no server metrics in this run", transform=ax.transAxes, ha="center")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("avg executed batch size")
    ax.set_title("Dynamic batching: executed batch size vs load")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if plotted:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_server_time_vs_load(steps: Sequence[Mapping[str, Any]], stage_models: Sequence[str], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=100)
    width = 0.8 / max(len(stage_models), 1)
    positions = range(len(steps))
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for k, model in enumerate(stage_models):
        queue = [(s.get(f"{model}_server_queue_us") or 0.0) / 1000.0 for s in steps]
        compute = [sum((s.get(f"{model}_{c}") or 0.0) for c in STAGE_SUM_COLUMNS[1:]) / 1000.0 for s in steps]
        xs = [p + (k - (len(stage_models) - 1) / 2) * width for p in positions]
        colour = colours[k % len(colours)]
        ax.bar(xs, compute, width, color=colour, label=f"{model} compute")
        ax.bar(xs, queue, width, bottom=compute, color=colour, alpha=0.35, hatch="//", label=f"{model} queue")
    # The ensemble's end-to-end time: the gap above the stage bars is time no stage's Triton counters see, i.e.
    # generation inside the decoupled LLM engine.
    total = [(p, s["server_request_us"] / 1000.0) for p, s in zip(positions, steps, strict=True)
             if s.get("server_request_us") is not None]  # fmt: skip
    if total:
        ax.plot(*zip(*total, strict=True), "k_", markersize=30, markeredgewidth=2, label="ensemble end-to-end")
    ax.set_xticks(list(positions), [f"c={s['concurrency']}" for s in steps])
    ax.set_ylabel("server time per request (ms)")
    ax.set_title("Queue vs compute per stage (Triton counters)")
    ax.grid(True, axis="y", alpha=0.3)
    # Below the axes: inside, it would hide the bars of the highest load, which matter most.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stage_models = report["models"][1:] or report["models"][:1]
    paths = {
        "csv": out_dir / "capacity.csv",
        "by_request_csv": out_dir / "capacity_by_request.csv",
        "json": out_dir / "capacity.json",
        "latency_vs_throughput": out_dir / "latency_vs_throughput.png",
        "batch_size_vs_load": out_dir / "batch_size_vs_load.png",
        "server_time_vs_load": out_dir / "server_time_vs_load.png",
    }
    write_csv(report["steps"], paths["csv"])
    write_csv(report["by_request"], paths["by_request_csv"])
    paths["json"].write_text(json.dumps(_json_safe(dict(report)), indent=1) + "\n")
    if report["steps"]:
        plot_latency_vs_throughput(report["steps"], paths["latency_vs_throughput"])
        plot_batch_size_vs_load(report["steps"], stage_models, paths["batch_size_vs_load"])
        plot_server_time_vs_load(report["steps"], stage_models, paths["server_time_vs_load"])
    return paths


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: Mapping[str, Any]) -> str:
    stage_models = report["models"][1:]
    head = f"{'step':>4} {'conc':>5} {'infer/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'fail':>5}"
    head += "".join(f" {m[:14] + ' batch':>20} {'queue/comp ms':>15}" for m in stage_models)
    lines = [head]
    for s in report["steps"]:
        line = (
            f"{s['step']:>4} {s['concurrency']:>5} {s['throughput_infer_per_sec']:>8.2f} "
            f"{_fmt(s['p50_latency_ms'], '8.1f')} {_fmt(s['p90_latency_ms'], '8.1f')} "
            f"{_fmt(s['p95_latency_ms'], '8.1f')} {_fmt(s['p99_latency_ms'], '8.1f')} {s['failure_count']:>5}"
        )
        for m in stage_models:
            queue = s.get(f"{m}_server_queue_us")
            compute = s.get(f"{m}_server_compute_infer_us")
            split = f"{_fmt(queue and queue / 1000, '.1f')}/{_fmt(compute and compute / 1000, '.1f')}"
            line += f" {_fmt(s.get(f'{m}_avg_batch_size'), '20.2f')} {split:>15}"
        lines.append(line)
    return "\n".join(lines)


def load_run(run_path: Path) -> dict[str, Any]:
    # Long soaks produce large run files; gzip-compressed ones (run.json.gz) are read as they are.
    opener = gzip.open if Path(run_path).suffix == ".gz" else open
    with opener(run_path, "rt", encoding="utf-8") as f:
        return json.load(f)


def generate(run_path: Path, out_dir: Path, slo_ms: float | None = None, slo_percentile: int = 95) -> dict[str, Any]:
    report = build_report(load_run(run_path), slo_ms, slo_percentile)
    write_report(report, out_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Capacity report (CSV, JSON, PNG) from a load-test run file.")
    parser.add_argument("run_data", type=Path, help="JSON (or .json.gz) written by the locustfile (--run-data)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the run file's)")
    parser.add_argument("--slo-ms", type=float, default=None, help="latency target for the summary")
    parser.add_argument("--slo-percentile", type=int, default=95, choices=PERCENTILES)
    args = parser.parse_args(argv)
    out_dir = args.out or args.run_data.parent
    report = generate(args.run_data, out_dir, args.slo_ms, args.slo_percentile)
    print(format_table(report))
    print(json.dumps(_json_safe(report["summary"]), indent=1))
    print(f"report written to {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
