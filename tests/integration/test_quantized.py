"""The tiny model served with bitsandbytes 8-bit and 4-bit returns HF's text under the same config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient
from images import PROMPTS
from reference import HFReference
from transformers import BitsAndBytesConfig
from triton_helpers import infer, start_server

CONFIGS = {
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
    # The server's 4-bit compute dtype follows its dtype option (float32 on CPU).
    "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def quantized(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tiny_t5_model_dir: Path, server_log_dir: Path
) -> Iterator[tuple]:
    mode = request.param
    server = start_server(
        server_log_dir,
        f"quant-{mode}",
        model_id=str(tiny_model_dir),
        t5_model_id=str(tiny_t5_model_dir),
        quantization=mode,
    )
    try:
        references = {
            model: HFReference(path, quantization_config=CONFIGS[mode], device_map={"": "cpu"})
            for model, path in (("blip2", tiny_model_dir), ("blip2_t5", tiny_t5_model_dir))
        }
        yield mode, server, references
    finally:
        server.stop()


@pytest.mark.parametrize("model", ["blip2", "blip2_t5"])
def test_quantized_matches_hf_with_same_config(quantized, model, sample_images) -> None:
    mode, server, references = quantized
    client = grpcclient.InferenceServerClient(server.grpc_url)
    names = sorted(sample_images)[:6]
    got = [infer(client, sample_images[n], p, model=model, max_tokens=10) for n in names for p in PROMPTS]
    want = [references[model](sample_images[n], p, 10) for n in names for p in PROMPTS]
    assert got == want
    log = Path(server.log_path).read_text()
    assert log.count(f"quantization={mode}") == 4  # both stages of both models
