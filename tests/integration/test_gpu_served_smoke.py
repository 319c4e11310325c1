"""The served GPU benchmark (`bench/gpu_served.py`) is meant for a GPU machine this project rarely gets; its CPU
smoke mode runs the same code path against real tritonservers here, so the script cannot rot unnoticed."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_reports import errors_in

pytestmark = pytest.mark.integration


def test_cpu_smoke_run_reports_every_figure(import_bench, tmp_path: Path) -> None:
    gpu_served = import_bench("gpu_served")
    out = tmp_path / "served.json"
    report = gpu_served.main(["--device", "cpu", "--tiny-shapes", "--clients", "2", "--rounds", "1", "--runs", "1",
                              "--tokens", "4", "--mixed-requests", "4",
                              "--quantization", "8bit", "--quantized-clients", "2",
                              "--cuda-graphs", "on",  # the fixed-buffer stages, eager on CPU
                              "--workdir", str(tmp_path),
                              "--output", str(out)])
    assert report["single_caption"]["served_ms"] > 0 and report["single_caption"]["served_over_in_process"] > 0
    point = report["captions_c2"]
    assert point["served"]["requests"] == 2 and point["in_process"]["requests_per_s"] > 0
    assert report["vqa_mixed_c32"]["inflight_over_static"] > 0
    assert report["vision"]["forward_ms_per_image_batch_32"] > 0
    vision = report["vision"]
    small, large = vision["preprocess_224x224"], vision["preprocess_640x480"]
    assert small["direct_resize"] == large["direct_resize"]
    assert small["decode_and_served_ms"] > 0 and large["decode_and_served_ms"] > 0
    assert large["jpeg_bytes"] > small["jpeg_bytes"]
    assert set(vision["decoder_pool_640x480_images_per_s"]) == {1, 2}
    assert report["gpu_memory_mib"] == {"inflight": {"at_start": {}, "after_load": {}}, "static": {"after_load": {}}}
    assert report["server_start_s"] > 0 and errors_in(report) == []
    quantized = report["quantized_8bit"]  # bitsandbytes runs 8-bit on CPU here
    assert "error" not in quantized, quantized
    assert quantized["requests"] == 2 and quantized["requests_per_s"] > 0 and quantized["gpu_memory_mib"] == {}
    assert out.read_text().startswith("{")
