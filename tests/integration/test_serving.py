"""Acceptance of the serving issue against a real tritonserver: HF-identical text, batching, controls."""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from images import PROMPTS
from transformers import Blip2ForConditionalGeneration
from triton_helpers import Clients, engine_counts, infer, model_stats
from tritonclient.utils import InferenceServerException

from blip2_triton.compute_lock import stage_threads
from blip2_triton.options import ServerOptions

MAX_TOKENS = 12


def _cases(images: dict[str, bytes]) -> list[tuple[str, bytes, str | None, int]]:
    # Varying max_tokens across cases also exercises rows of different lengths in one batch.
    return [
        (name, data, prompt, 6 + (i * 5) % 14)
        for i, (name, data) in enumerate(sorted(images.items()))
        for prompt in PROMPTS
    ]


@pytest.fixture(params=["grpc", "http"])
def clients(request: pytest.FixtureRequest, triton_server):
    c = Clients(request.param, triton_server)
    yield c
    c.close()


def test_images_cover_the_required_modes(sample_images: dict[str, bytes]) -> None:
    assert len(sample_images) >= 12


def test_one_by_one_matches_hf(clients, sample_images, reference) -> None:
    mismatches = []
    for name, data, prompt, n in _cases(sample_images):
        got = clients.infer(data, prompt, max_tokens=n)
        want = reference(data, prompt, n)
        if got != want:
            mismatches.append((name, prompt, got, want))
    assert not mismatches


def test_concurrent_matches_hf_and_batches(clients, triton_server, sample_images, reference) -> None:
    cases = _cases(sample_images)
    vision_before = model_stats(triton_server.http_hostport, "blip2_vision")
    engine_before = engine_counts(triton_server, "blip2_llm")
    # 32 requests in flight at once: every case once, sent from 32 threads.
    with ThreadPoolExecutor(max_workers=32) as pool:
        got = list(pool.map(lambda c: clients.infer(c[1], c[2], max_tokens=c[3]), cases))
    vision_after = model_stats(triton_server.http_hostport, "blip2_vision")
    engine_after = engine_counts(triton_server, "blip2_llm")
    want = [reference(data, prompt, n) for _, data, prompt, n in cases]
    assert got == want
    inferences, executions = (a - b for a, b in zip(vision_after, vision_before, strict=True))
    assert inferences == len(cases)
    # Fewer executions than inferences means Triton ran batches larger than one.
    assert executions < inferences, f"blip2_vision: {executions} executions for {inferences} inferences"
    # The LLM stage batches inside its in-flight engine (Triton hands requests over one by one, at once):
    # its forward passes ran more than one sequence on average.
    sequences, steps = (a - b for a, b in zip(engine_after, engine_before, strict=True))
    assert steps > 0 and sequences / steps > 1.0, f"blip2_llm engine: {sequences} sequences in {steps} passes"


def test_mixed_controls_in_one_batch(triton_server, sample_images, reference) -> None:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    images = sorted(sample_images.items())
    sampled = {"temperature": 8.0, "top_k": 40, "top_p": 0.95, "seed": 1234, "max_tokens": 15}
    alone = infer(client, images[0][1], None, **sampled)
    assert alone != reference(images[0][1], None, 15), "the sampled request should differ from greedy"
    jobs: list[tuple[bytes, str | None, dict]] = []
    for i, (_, data) in enumerate(images[:10]):
        jobs.append((data, PROMPTS[i % 2], {"max_tokens": 3 + i}))
        jobs.append((images[0][1], None, sampled))
    jobs.append((images[1][1], None, {"temperature": 1.3, "seed": 99, "max_tokens": 20}))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda j: infer(client, j[0], j[1], **j[2]), jobs))
    for (data, prompt, controls), got in zip(jobs, results, strict=True):
        if controls is sampled:
            assert got == alone
        elif "temperature" not in controls:
            assert got == reference(data, prompt, controls["max_tokens"])
    # The seeded sample is also HF's own: torch.manual_seed(seed) then generate(do_sample=True, ...).
    import torch

    torch.manual_seed(sampled["seed"])
    hf = reference(images[0][1], None, 15, do_sample=True, temperature=8.0, top_k=40, top_p=0.95)
    assert alone == hf


def test_beam_search_matches_hf(triton_server, sample_images, reference) -> None:
    client = httpclient.InferenceServerClient(triton_server.http_hostport)
    data = sample_images["rgb_jpeg"]
    got = infer(client, data, None, max_tokens=10, beam_width=3)
    assert got == reference(data, None, 10, num_beams=3)


def _split_counts(model_dir: Path) -> tuple[int, int]:
    full = Blip2ForConditionalGeneration.from_pretrained(model_dir)
    vision = sum(p.numel() for n, p in full.named_parameters() if not n.startswith("language_model."))
    llm = sum(p.numel() for n, p in full.named_parameters() if n.startswith("language_model."))
    assert vision + llm == sum(p.numel() for p in full.parameters())
    return vision, llm


def test_each_stage_holds_only_its_own_parameters(triton_server, tiny_model_dir: Path, tiny_t5_model_dir: Path) -> None:
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as r:
        metrics = r.read().decode()
    held = {
        m.group(1): int(float(m.group(2)))
        for m in re.finditer(r'^blip2_stage_parameters\{[^}]*model="(\w+)"[^}]*\} (\S+)$', metrics, re.M)
    }
    opt_vision, opt_llm = _split_counts(tiny_model_dir)
    t5_vision, t5_llm = _split_counts(tiny_t5_model_dir)
    assert held == {
        "blip2_vision": opt_vision, "blip2_llm": opt_llm, "blip2_t5_vision": t5_vision, "blip2_t5_llm": t5_llm,
    }
    log = Path(triton_server.log_path).read_text()
    # On this CPU host the stages overlap (BLIP2_COMPUTE_LOCK=auto), each on its share of the cores, and run
    # their linear layers on packed weights.
    # With FlanT5 beside OPT the launcher tells the stages that four of them share the cores.
    threads = stage_threads(ServerOptions(cpu_stages=4), "cpu")
    for model in ("blip2_vision", "blip2_llm", "blip2_t5_vision", "blip2_t5_llm"):
        line = re.search(rf"{model}: (\d+) torch threads \(compute_lock=auto, cpu_threads=auto, cpu_stages=4,", log)
        assert line is not None, model
        if threads is not None:  # None: OMP_NUM_THREADS is set in this environment and decides
            assert int(line.group(1)) == threads
    assert "compute lock on" not in log
    assert len(re.findall(r"stage=\w+ loaded .* packed_layers=[1-9]", log)) == 4
    assert f"stage=vision loaded {tiny_model_dir}: {opt_vision} parameters" in log
    assert f"stage=llm loaded {tiny_model_dir}: {opt_llm} parameters" in log
    assert f"stage=llm loaded {tiny_t5_model_dir}: {t5_llm} parameters" in log


@pytest.mark.parametrize(
    ("image", "prompt", "controls", "message"),
    [
        (b"", None, {}, "image: expected encoded image bytes, got 0 bytes"),
        (b"definitely not an image", None, {}, "not a supported image file"),
        ("rgb_jpeg", None, {"max_tokens": 0}, "max_tokens: expected 1..256, got 0"),
        ("rgb_jpeg", None, {"temperature": float("nan")}, "temperature"),
        ("rgb_jpeg", "Question: <image> Answer:", {}, "must not contain the image token"),
    ],
)
def test_bad_request_fails_alone(triton_server, sample_images, reference, image, prompt, controls, message) -> None:
    clients = Clients("http", triton_server)
    data = sample_images[image] if isinstance(image, str) else image
    good = sample_images["bmp"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        goods = [pool.submit(clients.infer, good, None, max_tokens=8) for _ in range(6)]
        bad = pool.submit(clients.infer, data, prompt, **controls)
        with pytest.raises(InferenceServerException) as e:
            bad.result()
        assert message in str(e.value)
        assert e.value.status() == "400"
        assert all(f.result() == reference(good, None, 8) for f in goods)
    assert clients.get().is_server_ready()
    clients.close()


@pytest.mark.parametrize("model", ["blip2", "blip2_t5"])
def test_token_count_and_finish_reason_come_with_the_text(clients, sample_images, model) -> None:
    module = grpcclient if clients.protocol == "grpc" else httpclient
    from triton_helpers import build_inputs

    for max_tokens in (1, 7):
        result = clients.get().infer(model, build_inputs(module, sample_images["rgba_png"], None,
                                                         max_tokens=max_tokens))
        text = result.as_numpy("text_output")[0, 0].decode()
        tokens = int(result.as_numpy("num_output_tokens")[0, 0])
        reason = result.as_numpy("finish_reason")[0, 0].decode()
        assert text == clients.infer(sample_images["rgba_png"], None, model=model, max_tokens=max_tokens)
        assert 0 <= tokens <= max_tokens
        assert reason == "length" if tokens == max_tokens else reason == "stop"
        # Image tokens (the checkpoint's query tokens) and the caption path's BOS.
        assert int(result.as_numpy("num_input_tokens")[0, 0]) > 1
