"""Server options: `config.pbtxt` parameters, overridden by environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ConfigurationError

DTYPES = ("auto", "float16", "bfloat16", "float32")
DEVICES = ("auto", "cuda", "cpu")
QUANTIZATIONS = ("none", "8bit", "4bit")

# Environment variable for each option. Environment wins over config.pbtxt so one repository serves the
# tiny model in tests and a real checkpoint in a container. A model's `env_prefix` parameter replaces
# `BLIP2_` (the FlanT5 models read `BLIP2_T5_MODEL_ID`, ...), so two checkpoints can be served side by side.
DEFAULT_ENV_PREFIX = "BLIP2_"
ENV_VARS = {
    "model_id": "BLIP2_MODEL_ID",
    "dtype": "BLIP2_DTYPE",
    "device": "BLIP2_DEVICE",
    "quantization": "BLIP2_QUANTIZATION",
    "cache_dir": "BLIP2_CACHE_DIR",
    "default_max_tokens": "BLIP2_DEFAULT_MAX_TOKENS",
    "max_max_tokens": "BLIP2_MAX_MAX_TOKENS",
    "max_image_bytes": "BLIP2_MAX_IMAGE_BYTES",
    "max_image_pixels": "BLIP2_MAX_IMAGE_PIXELS",
    "max_prompt_tokens": "BLIP2_MAX_PROMPT_TOKENS",
    "max_beam_width": "BLIP2_MAX_BEAM_WIDTH",
    "tiny_family": "BLIP2_TINY_FAMILY",
    "scheduler": "BLIP2_SCHEDULER",
    "max_active_sequences": "BLIP2_MAX_ACTIVE_SEQUENCES",
    "max_kv_tokens": "BLIP2_MAX_KV_TOKENS",
    "embedding_cache_bytes": "BLIP2_EMBEDDING_CACHE_BYTES",
    "compute_lock": "BLIP2_COMPUTE_LOCK",
    "compute_lock_file": "BLIP2_COMPUTE_LOCK_FILE",
    "cudnn_attention": "BLIP2_CUDNN_ATTENTION",
    "packed_weights": "BLIP2_PACKED_WEIGHTS",
    "cpu_threads": "BLIP2_CPU_THREADS",
    "cpu_stages": "BLIP2_CPU_STAGES",
}
FAMILIES = ("opt", "t5")
SCHEDULERS = ("inflight", "static")
COMPUTE_LOCKS = ("auto", "on", "off")
PACKED_WEIGHTS = ("auto", "on", "off")
ON_OFF = ("on", "off")


def env_var(name: str, prefix: str = DEFAULT_ENV_PREFIX) -> str:
    return prefix + ENV_VARS[name][len(DEFAULT_ENV_PREFIX):]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blip2-triton"


@dataclass(frozen=True)
class ServerOptions:
    model_id: str = ""
    dtype: str = "auto"
    device: str = "auto"
    quantization: str = "none"
    cache_dir: str = ""
    default_max_tokens: int = 30
    max_max_tokens: int = 256
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_prompt_tokens: int = 256
    max_beam_width: int = 8
    # Which embedded tiny checkpoint serves when model_id is empty.
    tiny_family: str = "opt"
    # LLM stage: `inflight` admits and retires sequences at every decoding step; `static` generates each
    # Triton dynamic batch to completion (the plain dynamic-batching behaviour, kept for comparison).
    scheduler: str = "inflight"
    max_active_sequences: int = 64
    # KV-cache budget in token positions summed over active sequences (prompt + max_tokens each).
    max_kv_tokens: int = 65536
    # Vision-stage image-embedding cache budget (blip2_triton.embedding_cache); 0 disables it.
    embedding_cache_bytes: int = 256 * 1024 * 1024
    # `on`: stage processes take turns for forward passes, each on all cores; `auto`/`off`: they overlap, and on
    # CPU each gets its share of the cores (blip2_triton.compute_lock).
    compute_lock: str = "auto"
    # Shared by every stage process of a host; empty: blip2-triton-compute-<uid>.lock in the temp directory.
    compute_lock_file: str = ""
    # LLM stage on CUDA: whether attention may use cuDNN's kernel. Off by default: with a padding mask PyTorch
    # picks it first, and the in-flight batch's shape changes every step, which cost 1.5 ms of host time per
    # layer call on an H200 (blip2-opt-2.7b shapes: 0.27x the static scheduler's req/s, 0.79x without it).
    # The setting is process-wide.
    cudnn_attention: str = "off"
    # CPU stages: linear layers run on weights packed once for oneDNN (blip2_triton.packed_linear) instead of
    # being re-packed by every GEMM call. `auto`: wherever it applies (CPU, float32/bfloat16, not quantised) and
    # passes its load-time check; `on`: refuse to start otherwise.
    packed_weights: str = "auto"
    # torch threads of a stage process; 0: automatic (blip2_triton.compute_lock.stage_threads).
    cpu_threads: int = 0
    # Computing stage processes sharing the host's cores (vision + LLM; the launcher says 4 with FlanT5 beside OPT).
    cpu_stages: int = 2

    def validate(self) -> None:
        for name, allowed in (
            ("dtype", DTYPES), ("device", DEVICES), ("quantization", QUANTIZATIONS), ("tiny_family", FAMILIES),
            ("scheduler", SCHEDULERS), ("compute_lock", COMPUTE_LOCKS), ("cudnn_attention", ON_OFF),
            ("packed_weights", PACKED_WEIGHTS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigurationError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("default_max_tokens", "max_max_tokens", "max_image_bytes", "max_image_pixels",
                     "max_prompt_tokens", "max_beam_width", "max_active_sequences", "max_kv_tokens", "cpu_stages"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpu_threads < 0:
            raise ConfigurationError(f"cpu_threads must be >= 0 (0: automatic), got {self.cpu_threads}")
        if self.default_max_tokens > self.max_max_tokens:
            raise ConfigurationError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_max_tokens ({self.max_max_tokens})"
            )

    @classmethod
    def resolve(
        cls, parameters: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
    ) -> ServerOptions:
        parameters = parameters or {}
        env = os.environ if env is None else env
        prefix = parameters.get("env_prefix") or DEFAULT_ENV_PREFIX
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = env.get(env_var(field.name, prefix)) or parameters.get(field.name)
            if raw is None or raw == "":
                continue
            if field.type == "int":
                try:
                    values[field.name] = int(raw)
                except ValueError as e:
                    raise ConfigurationError(f"{field.name} must be an integer, got {raw!r}") from e
            else:
                values[field.name] = str(raw).strip()
        options = cls(**values)  # type: ignore[arg-type]
        options.validate()
        return options

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()


def parameters_from_model_config(model_config: Mapping[str, object]) -> dict[str, str]:
    """Flattens Triton's `parameters { key: "x" value: { string_value: "y" } }` JSON form."""
    raw = model_config.get("parameters") or {}
    out: dict[str, str] = {}
    if isinstance(raw, Mapping):
        for key, value in raw.items():
            if isinstance(value, Mapping):
                out[str(key)] = str(value.get("string_value", ""))
    return out
