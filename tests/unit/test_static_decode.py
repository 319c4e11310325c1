"""Decoding on fixed buffers (BLIP2_CUDA_GRAPHS=on), run eagerly on CPU: the same text as HF and as the eager
path, with sequences joining and leaving, and seeds that keep their meaning."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from graph_replay import ReplayPool
from images import PROMPTS

from blip2_triton.errors import ConfigurationError
from blip2_triton.llm import Completion, EngineLimits, InflightEngine, Job, LanguageStage
from blip2_triton.llm.static import StaticBatchState, StaticRunner
from blip2_triton.options import ServerOptions
from blip2_triton.requests import GenerationRequest, ImageRequest
from blip2_triton.vision import VisionStage


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, sample_images):
    vision = VisionStage(ServerOptions(model_id=str(tiny_model_dir)))
    static = LanguageStage(ServerOptions(model_id=str(tiny_model_dir), cuda_graphs="on"))
    names = sorted(sample_images)
    embeds = dict(zip(names, vision.run([ImageRequest(sample_images[n]) for n in names]), strict=True))
    return static, embeds


def test_the_fixed_buffer_runner_is_chosen_and_sized_for_the_longest_request(setup) -> None:
    static, _ = setup
    assert isinstance(static.runner, StaticRunner)
    batch = static.runner.new_batch(max_rows=5)
    assert isinstance(batch, StaticBatchState)
    assert batch.max_rows == 8 and batch.capacity % 64 == 0
    longest = static.num_query_tokens + static.options.max_prompt_tokens + 1 + static.options.max_max_tokens
    assert batch.capacity >= min(static.max_positions, longest)


def test_static_batches_match_hf(setup, sample_images, reference) -> None:
    static, embeds = setup
    requests, expected = [], []
    for i, name in enumerate(sorted(embeds)):
        for prompt in PROMPTS:
            n = 3 + (i * 5) % 17
            requests.append(GenerationRequest(query_embeds=embeds[name], prompt=prompt, max_tokens=n))
            expected.append(reference(sample_images[name], prompt, n))
    assert static.run(requests) == expected


def test_joins_and_departures_in_flight_match_hf(setup, sample_images, reference) -> None:
    static, embeds = setup
    names = sorted(embeds)
    prompts = [None, PROMPTS[0], PROMPTS[1] + " and what else is there to see here?"]
    cases = [(names[i % len(names)], prompts[i % 3], 2 + (i * 7) % 23) for i in range(14)]
    results: dict[int, Completion | Exception] = {}
    done = threading.Event()

    def job(i: int, request: GenerationRequest) -> Job:
        def finished(result: Completion | Exception) -> None:
            results[i] = result
            if len(results) == len(cases):
                done.set()

        return Job(request=request, on_piece=None, on_done=finished)

    engine = InflightEngine(static, limits=EngineLimits(max_active=5))
    try:
        for i, (name, prompt, n) in enumerate(cases):
            engine.submit([job(i, GenerationRequest(query_embeds=embeds[name], prompt=prompt, max_tokens=n))])
            time.sleep(0.003)
        assert done.wait(120)
    finally:
        engine.stop()
    for i, (name, prompt, n) in enumerate(cases):
        result = results[i]
        assert isinstance(result, Completion), result
        assert result.text == reference(sample_images[name], prompt, n)


def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(setup) -> None:
    static, embeds = setup
    emb = next(iter(embeds.values()))

    def sampled() -> GenerationRequest:
        return GenerationRequest(query_embeds=emb, max_tokens=12, temperature=0.9, top_p=0.9, seed=7)

    alone = static.run([sampled()])[0]
    batched = static.run([GenerationRequest(query_embeds=e, max_tokens=9) for e in embeds.values()] + [sampled()])
    assert batched[-1] == alone


def test_on_refuses_checkpoints_it_cannot_serve(tiny_t5_model_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="cuda_graphs=on: encoder-decoder"):
        LanguageStage(ServerOptions(model_id=str(tiny_t5_model_dir), cuda_graphs="on"))


def test_auto_stays_eager_without_a_gpu(tiny_model_dir: Path) -> None:
    stage = LanguageStage(ServerOptions(model_id=str(tiny_model_dir), cuda_graphs="auto"))
    assert not isinstance(stage.runner, StaticRunner)


@pytest.fixture
def pools(monkeypatch: pytest.MonkeyPatch) -> list[ReplayPool]:
    """Every graph pool a batch state makes from now on: a `ReplayPool`, listed here."""
    from blip2_triton.llm import static

    made: list[ReplayPool] = []
    monkeypatch.setattr(static, "GraphPool", lambda device: made.append(ReplayPool(device)) or made[-1])
    return made


@pytest.fixture
def replayed(tiny_model_dir: Path, pools):
    stage = LanguageStage(ServerOptions(model_id=str(tiny_model_dir), cuda_graphs="on"))
    stage.runner.decoder.graphs = True  # type: ignore[attr-defined]
    return stage


def test_graphs_replayed_for_a_second_batch_read_that_batchs_buffers(replayed, pools, setup, sample_images,
                                                                     reference) -> None:
    _, embeds = setup
    names = sorted(embeds)
    # Each `run` holds its own batch state; graphs captured for the first must not be replayed on the second's.
    for name, prompt in ((names[0], PROMPTS[0]), (names[1], None), (names[2 % len(names)], PROMPTS[1])):
        (text,) = replayed.run([GenerationRequest(query_embeds=embeds[name], prompt=prompt, max_tokens=9)])
        assert text == reference(sample_images[name], prompt, 9)
    # One batch state and one pool per `run`, each with its own graphs.
    assert len(pools) == 3 and all(pool.captured for pool in pools)


def test_graphs_captured_before_the_first_request_serve_joining_rows(replayed, setup, sample_images,
                                                                     reference) -> None:
    _, embeds = setup
    engine = InflightEngine(replayed, limits=EngineLimits(max_active=5))
    try:
        captured = engine.capture_graphs()
        batch = engine.batch
        columns = batch.capacity // 64  # type: ignore[attr-defined]
        assert captured == 4 * columns  # row buckets 1, 2, 4 and 8 (5 rows round up to 8), every column bucket
        assert set(batch.graphs) == {(r, c * 64) for r in (1, 2, 4, 8) for c in range(1, columns + 1)}  # type: ignore[attr-defined]
        assert engine.capture_graphs() == 0
        names = sorted(embeds)
        cases = [(names[i % len(names)], (None, *PROMPTS)[i % 3], 3 + (i * 5) % 11) for i in range(7)]
        results: dict[int, Completion | Exception] = {}
        done = threading.Semaphore(0)

        def finished(i: int, result: Completion | Exception) -> None:
            results[i] = result
            done.release()

        for i, (name, prompt, n) in enumerate(cases):
            engine.submit([Job(request=GenerationRequest(query_embeds=embeds[name], prompt=prompt, max_tokens=n),
                               on_piece=None, on_done=lambda r, i=i: finished(i, r))])
            time.sleep(0.01 * (i % 3))  # rows join a batch already decoding
        for _ in cases:
            assert done.acquire(timeout=120)
        for i, (name, prompt, n) in enumerate(cases):
            assert results[i].text == reference(sample_images[name], prompt, n)  # type: ignore[union-attr]
        # Every step replayed a graph captured up front: none was captured at first use.
        assert len(batch.pool.captured) == captured  # type: ignore[attr-defined]
    finally:
        engine.stop()


def test_merge_copies_each_rows_own_positions_from_the_left_padded_prefill(setup) -> None:
    from types import SimpleNamespace

    import torch

    from blip2_triton.llm.batch import Prefilled

    static, _ = setup
    batch = static.runner.new_batch(max_rows=8)
    config = static.lm.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    width, lengths = 9, [9, 4, 6]
    layers = [SimpleNamespace(keys=torch.randn(3, heads, width, head_dim),
                              values=torch.randn(3, heads, width, head_dim)) for _ in range(config.num_hidden_layers)]
    seqs = [SimpleNamespace(prompt_ids=list(range(length))) for length in lengths]

    def prefilled(rows: slice) -> Prefilled:
        cache = SimpleNamespace(layers=[SimpleNamespace(keys=la.keys[rows], values=la.values[rows]) for la in layers])
        n = len(range(3)[rows])
        return Prefilled(cache, torch.ones(n, width), torch.zeros(n))

    batch.merge(seqs[:1], prefilled(slice(0, 1)))  # then two rows joining after it, at row 1
    batch.merge(seqs[1:], prefilled(slice(1, 3)))
    assert batch.lengths[:3].tolist() == lengths
    for layer, la in enumerate(layers):
        for row, length in enumerate(lengths):
            assert torch.equal(batch.keys[layer][row, :, :length], la.keys[row, :, width - length:])
            assert torch.equal(batch.values[layer][row, :, :length], la.values[row, :, width - length:])


def test_more_active_sequences_than_the_largest_row_bucket(tiny_model_dir: Path) -> None:
    options = ServerOptions(model_id=str(tiny_model_dir), max_active_sequences=300, cuda_graphs="on")
    with pytest.raises(ConfigurationError, match="at most 256 rows, max_active_sequences is 300"):
        LanguageStage(options)
