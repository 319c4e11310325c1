"""`BLIP2_INSTANCE_KIND=gpu` against the real tritonserver on this GPU-less host: the launcher's command line makes
Triton read every computing stage's `configs/gpu.pbtxt` (each then refuses to load for want of a GPU, which shows
that the file parsed and its KIND_GPU instance group was read), while models without one (stream front ends,
ensembles) fall back to their config.pbtxt."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from blip2_triton.generated import FIRST_GPU, GPU_VARIANTS
from blip2_triton.supervisor import LaunchSettings, find_tritonserver, stage_environment, tritonserver_command

# Triton 2.51's refusals of a KIND_GPU group without GPUs: one per GPU, or pinned to GPU 0.
NO_GPUS = "has kind KIND_GPU but no GPUs are available"
NO_GPU_0 = "specifies invalid or unsupported gpu id 0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the KIND_GPU stages would load")
def test_gpu_instance_kind_reads_the_gpu_configs_and_falls_back_elsewhere(tmp_path: Path) -> None:
    install = find_tritonserver()
    settings = LaunchSettings.on_free_ports(instance_kind="gpu", with_t5=True, with_itm=True)
    env = stage_environment(settings, install, {**os.environ, "BLIP2_CACHE_DIR": str(tmp_path)})
    command = tritonserver_command(settings, install)
    # Without it Triton would load the CPU configs and serve instead of ending.
    assert "--model-config-name=gpu" in command
    # Triton ends by itself: --model-control-mode=none with models that failed to load.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    status = dict(re.findall(r"^\| (blip2\w*) +\| 1 +\| (.*?) *\|$", log, re.M))
    for model, (group, _) in GPU_VARIANTS.items():
        name = Path(model).name
        refusal = NO_GPU_0 if group == FIRST_GPU[0] else NO_GPUS
        assert status[name].startswith("UNAVAILABLE") and refusal in status[name], (name, status.get(name))
    # No variant: the stream front ends load from their config.pbtxt; the ensembles are refused only for their steps.
    assert status["blip2_stream"] == status["blip2_t5_stream"] == "READY"
    for ensemble in ("blip2", "blip2_t5", "blip2_embed_image", "blip2_embed_text", "blip2_similarity", "blip2_match"):
        assert re.search(rf"ensemble '{ensemble}' depends on '\w+' which has no loaded version", log), ensemble
