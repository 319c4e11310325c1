"""The embedded default, the trained scenes model, served as `blip2-triton serve` serves it without a model id:
exact captions and answers on 200 scenes it never saw (seeds past the training range), over gRPC and HTTP, one
request at a time and many rows per request, each text equal to HF `generate` on the shipped checkpoint; and under
Locust load, answers that end at EOS long before `max_tokens`, with no failures."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from images import encode
from reference import HFReference
from triton_helpers import run_locust

from blip2_triton.scenes import HELD_OUT_SEED_START, make_scene, requests, shipped_model_dir

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `loadtest` is a plain directory of the checkout, not an installed package

from loadtest import prom  # noqa: E402

pytestmark = pytest.mark.integration

SCENES = 200
FIRST_SEED = HELD_OUT_SEED_START + 10_000  # past the training range and the training script's own evaluation
MAX_TOKENS = 30
ROWS = 16  # the ensemble's max_batch_size


@pytest.fixture(scope="module")
def cases() -> list[tuple[bytes, str | None, str]]:
    """(image, prompt or None for a caption, expected text): each scene's caption and its first question (the
    questions are shuffled per scene, so the 200 cover every kind)."""
    out = []
    for seed in range(FIRST_SEED, FIRST_SEED + SCENES):
        scene = make_scene(seed)
        image = encode(scene.image, "PNG")
        caption, question = requests(scene)[:2]
        out += [(image, *caption), (image, *question)]
    return out


@pytest.fixture(scope="module")
def hf_texts(cases: list[tuple[bytes, str | None, str]]) -> list[str]:
    reference = HFReference(shipped_model_dir("opt"))
    return [reference(image, prompt, MAX_TOKENS) for image, prompt, _ in cases]


def infer(module: Any, client: Any, rows: list[tuple[bytes, str | None, str]]) -> list[str]:
    image = module.InferInput("image", [len(rows), 1], "BYTES")
    image.set_data_from_numpy(np.array([[r[0]] for r in rows], dtype=np.object_))
    prompt = module.InferInput("text_input", [len(rows), 1], "BYTES")  # empty: a caption
    prompt.set_data_from_numpy(np.array([[(r[1] or "").encode()] for r in rows], dtype=np.object_))
    tokens = module.InferInput("max_tokens", [len(rows), 1], "INT32")
    tokens.set_data_from_numpy(np.full((len(rows), 1), MAX_TOKENS, dtype=np.int32))
    result = client.infer("blip2", [image, prompt, tokens])
    return [t.decode() for t in result.as_numpy("text_output").reshape(-1)]


def accuracy(texts: list[str], cases: list[tuple[bytes, str | None, str]]) -> dict[str, float]:
    kinds: dict[str, list[bool]] = {"caption": [], "vqa": []}
    for text, (_, prompt, expected) in zip(texts, cases, strict=True):
        kinds["vqa" if prompt else "caption"].append(text == expected)
    return {kind: sum(hits) / len(hits) for kind, hits in kinds.items()}


def test_the_reference_itself_is_accurate(cases: list[tuple[bytes, str | None, str]], hf_texts: list[str]) -> None:
    scores = accuracy(hf_texts, cases)
    print(f"HF generate on {SCENES} held-out scenes: {scores}")
    assert scores["caption"] >= 0.9 and scores["vqa"] >= 0.9, scores


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("rows", [1, ROWS], ids=["one-by-one", "batched"])
def test_served_texts_are_exact_and_equal_hf(default_server: Any, cases: list[tuple[bytes, str | None, str]],
                                             hf_texts: list[str], protocol: str, rows: int) -> None:
    if protocol == "grpc":
        module, client = grpcclient, grpcclient.InferenceServerClient(default_server.grpc_url)
    else:
        module, client = httpclient, httpclient.InferenceServerClient(default_server.http_hostport)
    try:
        texts = [t for i in range(0, len(cases), rows) for t in infer(module, client, cases[i:i + rows])]
    finally:
        client.close()
    differing = [(i, hf_texts[i], t) for i, t in enumerate(texts) if t != hf_texts[i]]
    assert not differing, f"{len(differing)} texts differ from HF generate, e.g. {differing[:5]}"
    scores = accuracy(texts, cases)
    assert scores["caption"] >= 0.9 and scores["vqa"] >= 0.9, scores


def engine_counters(metrics_url: str) -> dict[str, float]:
    samples = prom.scrape(metrics_url, timeout=10)
    return {name: prom.by_model(samples, name).get("blip2_llm", 0.0)
            for name in ("blip2_generated_tokens_total", "blip2_first_tokens_total")}


def test_locust_load_gets_answers_of_realistic_length(default_server: Any, tmp_path: Path) -> None:
    images = tmp_path / "scenes"
    images.mkdir()
    for seed in range(FIRST_SEED + SCENES, FIRST_SEED + SCENES + 64):
        make_scene(seed).image.save(images / f"{seed}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Question: {q} Answer:" for q in (
        "how many shapes are there?", "what colour is the background?", "how many circles are there?")) + "\n")
    before = engine_counters(default_server.metrics_url)
    run = run_locust(tmp_path, [
        "--host", default_server.http_url, "--grpc-url", default_server.grpc_url,
        "--metrics-url", default_server.metrics_url,
        "--load-mode", "fixed", "--fixed-users", "16", "--fixed-duration", "30", "--fixed-interval", "10",
        "--warmup", "2", "--max-tokens", str(MAX_TOKENS), "--vqa-ratio", "0.5", "--request-timeout", "60",
        "--image-dir", str(images), "--prompts-file", str(prompts), "Blip2GrpcUser", "Blip2HttpUser",
    ], timeout_s=150)  # fmt: skip
    after = engine_counters(default_server.metrics_url)
    answered = after["blip2_first_tokens_total"] - before["blip2_first_tokens_total"]
    tokens_each = (after["blip2_generated_tokens_total"] - before["blip2_generated_tokens_total"]) / answered
    print(f"Locust, 16 users, 30 s: {len(run['samples'])} requests, 0 failures, {tokens_each:.1f} tokens per answer "
          f"(max_tokens {MAX_TOKENS})")
    assert len(run["samples"]) > 100
    # A model that never stopped would average MAX_TOKENS; captions are at most 12 tokens, answers 1 or 2.
    assert tokens_each < MAX_TOKENS / 3, tokens_each
