"""The GPU check (`bench/gpu_check.py`) is meant for a machine this project rarely gets; its CPU smoke mode
runs the same code path here, so the script cannot rot unnoticed before someone runs it on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def gpu_check(import_bench):
    return import_bench("gpu_check")


def test_cpu_smoke_run_reports_latency_throughput_and_hf_identical_text(gpu_check, tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main([
        "--device", "cpu", "--tiny-shapes", "--latency-runs", "2", "--batches", "1", "--concurrency", "4",
        "--tokens", "6", "--output", str(out),
    ])
    single = report["single_request"]
    assert single["end_to_end"]["runs"] == 2 and single["end_to_end"]["median_ms"] > 0
    assert single["llm_ms_per_token"] > 0 and single["sample_text"]
    assert single["text_matches_hf"] is True and single["hf_generate"]["text"]
    assert single["llm_inflight"]["runs"] == 2 and single["llm_inflight"]["median_ms"] > 0
    assert report["concurrency_32"]["requests_per_s"] > 0
    assert set(report["decode_step_ms"]) == {"rows_1", "rows_4", "rows_4_padded"}
    assert all(ms > 0 for ms in report["decode_step_ms"].values())
    mixed = report["llm_mixed_c32"]
    assert mixed["requests"] == 4 * 4 and mixed["texts_identical"] is True
    assert mixed["static"]["requests_per_s"] > 0 and mixed["inflight"]["requests_per_s"] > 0
    assert report["shapes"] == "tiny" and report["dtype"] == "float32"
    assert out.read_text().strip().startswith("{")


def test_cuda_requested_without_a_gpu_is_a_clear_usage_error(gpu_check, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as exc:
        gpu_check.main([])
    assert exc.value.code == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
