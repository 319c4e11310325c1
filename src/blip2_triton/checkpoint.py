"""Loads one BLIP-2 stage from a checkpoint, holding only that stage's weights."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BitsAndBytesConfig,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
)
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel

from .errors import ConfigurationError
from .options import ServerOptions
from .packed_linear import PACKABLE_DTYPES, pack_linears

log = logging.getLogger(__name__)

def _has_only_pickle_weights(source: str) -> bool:
    path = Path(source)
    return path.is_dir() and not any(path.glob("*.safetensors")) and any(path.glob("*.bin"))


# Checkpoint prefixes of the vision stage: everything `get_image_features` touches.
VISION_PREFIXES = ("vision_model.", "query_tokens", "qformer.", "language_projection.")
LLM_PREFIXES = ("language_model.",)


def tiny_dirname(family: str) -> str:
    from .tiny import TINY_VERSION

    return f"tiny-blip2-{family}-v{TINY_VERSION}"


# Generating the tiny model takes seconds; a staging directory this old belongs to a generator that was killed.
STALE_STAGING_S = 600.0


def _remove_stale_staging(cache_dir: Path) -> None:
    now = time.time()
    for staging in cache_dir.glob(".tiny-*"):
        try:
            if now - staging.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(staging, ignore_errors=True)
        except FileNotFoundError:
            pass  # a concurrent generator finished or cleaned it meanwhile


def ensure_tiny_model(cache_dir: Path, family: str = "opt") -> Path:
    """The embedded default: generated once, then reused. Safe when both stages start at once."""
    from .tiny import write_tiny_model

    target = cache_dir / tiny_dirname(family)
    # Also when the model exists: a generator killed in a crash loop is usually followed, seconds later, by one
    # that succeeds, and every start after that takes the early return.
    _remove_stale_staging(cache_dir)
    if (target / "TINY_MODEL.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache_dir))
    try:
        write_tiny_model(staging, family=family)
        try:
            # rename() is atomic: a concurrent generator either wins or finds the finished directory.
            os.rename(staging, target)
        except OSError:
            if not (target / "TINY_MODEL.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_source(options: ServerOptions) -> str:
    if not options.model_id:
        return str(ensure_tiny_model(options.cache_path, options.tiny_family))
    path = Path(options.model_id).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigurationError(f"model directory {path} has no config.json")
        return str(path)
    # Anything else is a Hugging Face repo id, resolved through the local HF cache (HF_HOME).
    return options.model_id


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigurationError(f"device={device} was requested but no CUDA device is visible")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigurationError(f"device={device}: only {torch.cuda.device_count()} CUDA devices are visible")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def quantization_config(options: ServerOptions, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if options.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        # transformers would say "pip install bitsandbytes", which cannot be followed inside the CPU image.
        raise ConfigurationError(
            f"quantization={options.quantization} needs bitsandbytes, which this installation lacks (the CPU "
            "image has none); use the GPU image, pip install bitsandbytes, or set quantization=none"
        )
    if options.quantization != "none":
        # bitsandbytes logs a warning on *every* fp32 int8 matmul on CPU, which would flood the server log.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if options.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if options.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
    return None


class Blip2VisionStageModel(Blip2ForConditionalGeneration):
    """BLIP-2 without its language model.

    Subclassing keeps the parameter names, fp32 modules and quantisation rules of the full model, so
    `from_pretrained` reads the vision stage's tensors from a full checkpoint and skips the rest, and
    quantised loading treats each layer exactly as HF does for the full model.
    """

    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"^language_model\."]

    def __init__(self, config: Blip2Config) -> None:
        super(Blip2ForConditionalGeneration, self).__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    def get_output_embeddings(self) -> None:  # type: ignore[override]
        return None


class Blip2LanguageStageModel(Blip2ForConditionalGeneration):
    """BLIP-2's language model alone, under the same parameter names as in the full checkpoint."""

    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [
        r"^vision_model\.", r"^query_tokens", r"^qformer\.", r"^language_projection\."
    ]

    def __init__(self, config: Blip2Config) -> None:
        super(Blip2ForConditionalGeneration, self).__init__(config)
        if config.use_decoder_only_language_model:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            self.language_model = AutoModelForSeq2SeqLM.from_config(config.text_config)
        self.post_init()


@dataclass
class LoadedStage:
    model: Blip2ForConditionalGeneration
    processor: Blip2Processor
    config: Blip2Config
    source: str
    device: torch.device
    dtype: torch.dtype
    parameter_count: int
    parameter_bytes: int
    # Linear layers running on pre-packed oneDNN weights (`packed_weights`); 0 when HF's own run.
    packed_layers: int = 0


def count_parameters(module: nn.Module) -> tuple[int, int]:
    # Quantised 4-bit weights pack two values per byte; count logical elements through bnb's quant_state.
    count = 0
    nbytes = 0
    for p in module.parameters():
        state = getattr(p, "quant_state", None)
        count += int(state.shape.numel()) if state is not None else p.numel()
        nbytes += p.numel() * p.element_size()
    return count, nbytes


def load_stage(stage: str, options: ServerOptions) -> LoadedStage:
    if stage not in ("vision", "llm"):
        raise ValueError(f"stage must be 'vision' or 'llm', got {stage!r}")
    source = resolve_model_source(options)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    quant = quantization_config(options, dtype)
    cls = Blip2VisionStageModel if stage == "vision" else Blip2LanguageStageModel
    # Pickle weights (`pytorch_model.bin`) can run code while loading: safetensors only unless the operator opts in
    # for a checkpoint they trust (None lets transformers fall back to .bin). Checkpoint code is never run.
    allow_pickle = options.allow_pickle
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": None if allow_pickle else True,
                              "trust_remote_code": False}
    if allow_pickle:
        log.warning("allow_pickle: pickle (.bin) weights may be loaded; only do this for checkpoints you trust")
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None
                                else (0 if device.type == "cuda" else "cpu")}
    try:
        model = cls.from_pretrained(source, **kwargs)
        processor = Blip2Processor.from_pretrained(source, trust_remote_code=False)
    except OSError as e:
        if not allow_pickle and _has_only_pickle_weights(source):
            raise ConfigurationError(
                f"checkpoint {source!r} has only pickle (.bin) weights, which are refused because loading them can "
                "run code; convert them to safetensors, or set BLIP2_ALLOW_PICKLE=1 (unsafe; BLIP2_T5_ALLOW_PICKLE for "
                "FlanT5) for a trusted checkpoint"
            ) from e
        raise ConfigurationError(f"cannot load BLIP-2 checkpoint {source!r}: {e}") from e
    if quant is None:
        model = model.to(device)
    model.eval()
    count, nbytes = count_parameters(model)
    packed = _pack_weights(model, stage, options, device, dtype)
    log.info(
        "stage=%s loaded %s: %d parameters (%d bytes) dtype=%s device=%s quantization=%s packed_layers=%d",
        stage, source, count, nbytes, dtype, device, options.quantization, packed,
    )
    return LoadedStage(model, processor, model.config, source, device, dtype, count, nbytes, packed)


def _pack_weights(model: nn.Module, stage: str, options: ServerOptions, device: torch.device,
                  dtype: torch.dtype) -> int:
    if options.packed_weights == "off":
        return 0
    if device.type != "cpu" or options.quantization != "none" or dtype not in PACKABLE_DTYPES:
        if options.packed_weights == "on":
            raise ConfigurationError(
                "packed_weights=on needs a CPU device, quantization=none and float32 or bfloat16; got "
                f"device={device.type}, quantization={options.quantization}, dtype={str(dtype).removeprefix('torch.')}"
            )
        return 0
    try:
        return pack_linears(model)
    except RuntimeError as e:
        if options.packed_weights == "on":
            raise ConfigurationError(f"packed_weights=on: {e}") from e
        # The server still runs, on HF's own linear layers, only slower on CPU.
        log.warning("stage=%s: linear layers keep HF's implementation: %s", stage, e)
        return 0
