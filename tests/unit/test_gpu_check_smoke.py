"""The GPU check (`bench/gpu_check.py`) is meant for a machine this project rarely gets; its CPU smoke mode
runs the same code path here, so the script cannot rot unnoticed before someone runs it on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_reports import errors_in


@pytest.fixture(scope="module")
def gpu_check(import_bench):
    return import_bench("gpu_check")


def test_cpu_smoke_run_reports_latency_throughput_and_hf_identical_text(gpu_check, tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main([
        "--device", "cpu", "--tiny-shapes", "--latency-runs", "2", "--batches", "1", "--concurrency", "4",
        "--tokens", "6", "--graphs", "skip", "--output", str(out),
    ])
    assert errors_in(report) == []
    single = report["single_request"]
    assert single["end_to_end"]["runs"] == 2 and single["end_to_end"]["median_ms"] > 0
    assert single["llm_ms_per_token"] > 0 and single["sample_text"]
    assert single["text_matches_hf"] is True and single["hf_generate"]["text"]
    assert single["llm_inflight"]["runs"] == 2 and single["llm_inflight"]["median_ms"] > 0
    assert report["concurrency_32"]["requests_per_s"] > 0
    assert set(report["decode_step_ms"]) == {"rows_1", "rows_4", "rows_4_padded"}
    iteration = report["engine_iteration"]["tokens_24"]
    assert iteration["rows"] == 4
    for kind in ("real_step", "host_only", "host_only_streaming"):
        assert iteration[kind]["iterations"] == 23 and 0 < iteration[kind]["ms_median"] <= iteration[kind]["ms_p90"]
    assert "syncs_per_iteration" not in iteration["real_step"]  # counted on CUDA only
    assert all(ms > 0 for ms in report["decode_step_ms"].values())
    mixed = report["llm_mixed_c32"]
    assert mixed["requests"] == 4 * 4 and mixed["texts_identical"] is True
    assert mixed["static"]["requests_per_s"] > 0 and mixed["inflight"]["requests_per_s"] > 0
    assert report["shapes"] == "tiny" and report["dtype"] == "float32"
    assert out.read_text().strip().startswith("{")
    vision = report["vision_graphs"]
    # On CPU `on` is the fixed-buffer forward run eagerly: no graphs, and the embeddings of the eager path.
    assert vision["graphs"] is False and vision["graph_bytes"] == 0
    for mode in ("off", "on"):
        assert set(vision[mode]) == {"batch_1", "batch_32"}
        assert all(entry["runs"] == 2 and entry["ms_per_image"] > 0 for entry in vision[mode].values())
    assert set(vision["on_over_off_per_image"]) == {"batch_1", "batch_32"}
    diffs = vision["max_abs_diff_vs_eager"]
    assert set(diffs) == {"batch_1", "batch_5", "batch_32"} and all(d <= 1e-5 for d in diffs.values()), diffs
    assert vision["max_abs_embedding"] > 0


def test_cuda_requested_without_a_gpu_is_a_clear_usage_error(gpu_check, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as exc:
        gpu_check.main([])
    assert exc.value.code == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_cpu_smoke_of_the_fixed_buffer_comparison(gpu_check) -> None:
    report = gpu_check.main([
        "--device", "cpu", "--tiny-shapes", "--latency-runs", "1", "--batches", "1", "--concurrency", "2",
        "--tokens", "4", "--mixed-rounds", "1", "--graph-rows", "1,3", "--graph-cached", "40",
        "--graph-clients", "3",
    ])
    assert errors_in(report) == []
    graphs = report["graphs"]
    assert graphs["copy_gbps"] is None and graphs["llm_weight_bytes"] > 0
    for mode, runner in (("off", "ModelRunner"), ("on", "StaticRunner")):
        result = graphs[mode]
        assert result["runner"] == runner
        # The end-to-end figures pass images through the vision stage of the same mode, as a served stage would.
        assert result["vision_fixed_buffers"] is (mode == "on")
        assert set(result["decode_step_ms"]) == {"rows_1_cached_40", "rows_3_cached_40"}
        assert result["request_16_tokens"]["runs"] == 1 and result["vqa_3_tokens"]["median_ms"] > 0
        assert result["captions_c3"]["requests_per_s"] > 0
        assert result["llm_mixed_c32"]["texts_identical"] is True
        assert all(entry["equal"] for entry in result["greedy_vs_hf"]), result["greedy_vs_hf"]
        assert result["seeded_alone_equals_batch_of_32"] is True


def test_the_comparison_with_graphs_replayed_as_on_a_gpu(gpu_check, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every capture and replay of the GPU run, emulated on CPU (tests/graph_replay.py): a graph replayed on buffers
    # other than those it was captured on shows here as text that differs from HF.
    from graph_replay import ReplayPool

    from blip2_triton.llm import static
    from blip2_triton.vision import graphs

    def replaying(cls: type, **fixed: object) -> None:
        init = cls.__init__

        def patched(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            init(self, *args, **{**kwargs, **fixed})
            if hasattr(self, "pool"):
                self.pool = ReplayPool()

        monkeypatch.setattr(cls, "__init__", patched)

    replaying(static.StaticDecoder, graphs=True)
    monkeypatch.setattr(static, "GraphPool", ReplayPool)  # a batch state's own pool
    replaying(graphs.BucketedForward, graphs=True)
    report = gpu_check.main([
        "--device", "cpu", "--tiny-shapes", "--latency-runs", "1", "--batches", "1", "--concurrency", "4",
        "--tokens", "6", "--mixed-rounds", "1", "--graph-rows", "1,4", "--graph-cached", "40,300",
        "--graph-clients", "4", "--vision-batches", "1,4",
    ])
    assert errors_in(report) == []
    on = report["graphs"]["on"]
    assert on["capture"]["graphs"] > 0 and on["engine_iteration"]["real_step"]["ms_median"] > 0
    assert all(entry["equal"] for entry in on["greedy_vs_hf"]), on["greedy_vs_hf"]
    assert on["seeded_alone_equals_batch_of_32"] is True and on["llm_mixed_c32"]["texts_identical"] is True
    vision = report["vision_graphs"]
    assert vision["graphs"] is True
    assert all(d <= 1e-5 for d in vision["max_abs_diff_vs_eager"].values()), vision["max_abs_diff_vs_eager"]
