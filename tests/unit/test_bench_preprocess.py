"""`bench/bench_preprocess.py` in its smoke mode: every figure present, and the served path resizes directly."""

from __future__ import annotations

from pathlib import Path


def test_quick_run_reports_decode_preprocess_and_the_pool(import_bench, tmp_path: Path) -> None:
    bench = import_bench("bench_preprocess")
    out = tmp_path / "pre.json"
    report = bench.main(["--quick", "--threads", "2", "--output", str(out)])
    pil = report["processor"].endswith("Pil")  # transformers picks its torchvision backend where torchvision is
    for size in ("224x224", "640x480"):
        entry = report[size]
        assert entry["direct_resize"] is pil
        assert entry["decode_ms"] > 0 and entry["hf_processor_ms"] > 0 and entry["served_ms"] > 0
        assert entry["decode_and_served_ms"] == round(entry["decode_ms"] + entry["served_ms"], 2)
    assert report["640x480"]["jpeg_bytes"] > report["224x224"]["jpeg_bytes"]
    pool = report["decoder_pool"]
    assert pool["image"] == "640x480"
    assert pool["threads_1_images_per_s"] > 0 and pool["threads_2_images_per_s"] > 0
    assert out.read_text().startswith("{")
