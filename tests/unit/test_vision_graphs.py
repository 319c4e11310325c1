"""The vision forward on fixed buffers per batch bucket (BLIP2_CUDA_GRAPHS=on), run eagerly on CPU: the embeddings
and the captions they lead to are the eager path's, whatever the batch and whatever ran before."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from graph_replay import ReplayPool
from images import PROMPTS

from blip2_triton.errors import ConfigurationError
from blip2_triton.llm import LanguageStage
from blip2_triton.options import ServerOptions
from blip2_triton.requests import GenerationRequest, ImageRequest
from blip2_triton.vision import VisionStage
from blip2_triton.vision.graphs import BucketedForward
from blip2_triton.vision.pipeline import VisionPipeline


@pytest.fixture(scope="module")
def stages(tiny_model_dir: Path) -> tuple[VisionStage, VisionStage]:
    options = ServerOptions(model_id=str(tiny_model_dir), embedding_cache_bytes=0)
    return VisionStage(options), VisionStage(replace(options, cuda_graphs="on"))


@pytest.fixture(scope="module")
def pixels(stages, sample_images) -> torch.Tensor:
    eager, _ = stages
    names = sorted(sample_images)
    return torch.stack([eager.prepare(ImageRequest(sample_images[names[i % len(names)]])) for i in range(40)])


def test_the_switch_chooses_the_path(stages, tiny_model_dir: Path) -> None:
    eager, fixed = stages
    assert eager.fixed is None
    assert fixed.fixed is not None and not fixed.fixed.graphs
    # auto takes the fixed buffers on CUDA only; nothing is captured without CUDA.
    assert VisionStage(ServerOptions(model_id=str(tiny_model_dir), cuda_graphs="auto")).fixed is None
    fixed.warm_up(32)
    assert fixed.graph_bytes == eager.graph_bytes == 0


def test_embeddings_equal_the_eager_path(stages, pixels) -> None:
    eager, fixed = stages
    # The largest batch first: its rows must not leak into the padding of the smaller ones after it. 40 rows run
    # as 32 + 8.
    for rows in (40, 17, 1, 3, 5):
        expected = eager.embed_pixels(pixels[:rows])
        got = fixed.embed_pixels(pixels[:rows])
        assert got.shape == expected.shape == (rows, *eager.output_shape)
        # Measured on this CPU (float32 and bfloat16 tiny model, packed weights on and off): equal to the bit.
        # Padding may change the rounding of batched kernels elsewhere, hence a tolerance, not equality.
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_captions_through_the_llm_are_unchanged(stages, tiny_model_dir: Path, sample_images, reference) -> None:
    _, fixed = stages
    llm = LanguageStage(ServerOptions(model_id=str(tiny_model_dir)))
    names = sorted(sample_images)
    # As served: decoded on the pipeline's threads, embedded in the compute thread's batches.
    pipeline = VisionPipeline(fixed, decode_threads=2, max_batch=3)
    done = threading.Event()
    embeds: list = []
    try:
        pipeline.submit([ImageRequest(sample_images[n]) for n in names],
                        lambda rows: (embeds.extend(rows), done.set()))
        assert done.wait(60), "the pipeline never answered"
    finally:
        pipeline.stop()
    requests, expected = [], []
    for name, emb in zip(names, embeds, strict=True):
        for prompt in (None, *PROMPTS):
            requests.append(GenerationRequest(query_embeds=emb, prompt=prompt, max_tokens=8))
            expected.append(reference(sample_images[name], prompt, 8))
    assert llm.run(requests) == expected


def test_batches_run_in_their_bucket_padded_with_zero_rows() -> None:
    seen: list[torch.Tensor] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x.flatten(1)[:, :2] * 2

    fixed = BucketedForward(forward, pixel_shape=(1, 2, 2), device=torch.device("cpu"), graphs=False)
    for rows, buckets in ((40, [32, 8]), (17, [32]), (9, [16]), (5, [8]), (3, [4]), (2, [2]), (1, [1]), (33, [32, 1])):
        seen.clear()
        pixels = torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 1, 2, 2) + 1
        assert torch.equal(fixed(pixels), pixels.flatten(1)[:, :2] * 2)
        assert [len(x) for x in seen] == buckets, rows
        last = rows - 32 * (len(seen) - 1)
        assert torch.equal(torch.cat([*seen[:-1], seen[-1][:last]]), pixels)
        assert not seen[-1][last:].any(), "padding must be zero rows"
    with pytest.raises(ValueError, match=r"expected rows of \(1, 2, 2\), got \(3, 2, 2\)"):
        fixed(torch.zeros(1, 3, 2, 2))


def test_on_refuses_quantization_before_loading(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"cuda_graphs=on: .*bitsandbytes-quantized"):
        VisionStage(ServerOptions(model_id=str(tiny_model_dir), cuda_graphs="on", quantization="8bit"))


def test_replayed_graphs_give_the_eager_embeddings(stages, tiny_model_dir: Path, pixels) -> None:
    eager, _ = stages
    replayed = VisionStage(ServerOptions(model_id=str(tiny_model_dir), embedding_cache_bytes=0, cuda_graphs="on"))
    assert replayed.fixed is not None
    replayed.fixed.graphs, replayed.fixed.pool = True, ReplayPool()
    replayed.warm_up(16)
    assert replayed.fixed.pool.captured == [f"the vision forward for {n} images" for n in (1, 2, 4, 8, 16)]
    for rows in (40, 5, 16, 1, 3):  # 40: 32 + 8, the 32-row bucket captured at first use
        np.testing.assert_allclose(replayed.embed_pixels(pixels[:rows]), eager.embed_pixels(pixels[:rows]),
                                   rtol=0, atol=1e-5)
    assert len(replayed.fixed.pool.captured) == 6
