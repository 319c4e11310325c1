"""FlanT5 BLIP-2 (`blip2_t5`) served beside OPT (`blip2`) by the same tritonserver."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from images import PROMPTS
from triton_helpers import Clients, engine_counts, model_stats


@pytest.fixture(params=["grpc", "http"])
def clients(request: pytest.FixtureRequest, triton_server):
    c = Clients(request.param, triton_server)
    yield c
    c.close()


def _cases(images: dict[str, bytes]) -> list[tuple[bytes, str | None, int]]:
    return [(data, prompt, 5 + i % 8) for i, (_, data) in enumerate(sorted(images.items())) for prompt in PROMPTS]


def test_t5_and_opt_match_hf_concurrently_on_one_server(
    clients, triton_server, sample_images, t5_reference, reference
) -> None:
    cases = _cases(sample_images)
    before = model_stats(triton_server.http_hostport, "blip2_t5_vision")
    engine_before = engine_counts(triton_server, "blip2_t5_llm")
    jobs = [("blip2_t5", c) for c in cases] + [("blip2", c) for c in cases[:8]]
    with ThreadPoolExecutor(max_workers=24) as pool:
        got = list(pool.map(lambda j: clients.infer(j[1][0], j[1][1], model=j[0], max_tokens=j[1][2]), jobs))
    after = model_stats(triton_server.http_hostport, "blip2_t5_vision")
    engine_after = engine_counts(triton_server, "blip2_t5_llm")
    want = [(t5_reference if model == "blip2_t5" else reference)(*case) for model, case in jobs]
    assert got == want
    assert len(set(got[: len(cases)])) > 3, "T5 outputs should vary with image and prompt"
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == len(cases)
    assert executions < inferences, f"blip2_t5_vision: {executions} executions for {inferences} inferences"
    # T5 requests are generated in batches by the LLM stage's engine thread (HF generate per batch).
    sequences, steps = (a - b for a, b in zip(engine_after, engine_before, strict=True))
    assert steps > 0 and sequences / steps > 1.0, f"blip2_t5_llm: {sequences} sequences in {steps} batches"


def test_t5_one_by_one_and_controls(triton_server, sample_images, t5_reference) -> None:
    clients = Clients("grpc", triton_server)
    data = sample_images["cmyk_jpeg"]
    for prompt in PROMPTS:
        assert clients.infer(data, prompt, model="blip2_t5", max_tokens=9) == t5_reference(data, prompt, 9)
    assert clients.infer(data, None, model="blip2_t5", max_tokens=7, beam_width=2) == t5_reference(
        data, None, 7, num_beams=2
    )
    sampled = {"temperature": 5.0, "seed": 11, "max_tokens": 10}
    alone = clients.infer(data, None, model="blip2_t5", **sampled)
    with ThreadPoolExecutor(max_workers=8) as pool:
        mixed = [pool.submit(clients.infer, data, None, model="blip2_t5", max_tokens=4) for _ in range(6)]
        mixed.append(pool.submit(clients.infer, data, None, model="blip2_t5", **sampled))
        results = [f.result() for f in mixed]
    assert results[-1] == alone
    torch.manual_seed(11)
    assert alone == t5_reference(data, None, 10, do_sample=True, temperature=5.0, top_k=0)
    clients.close()
