"""Stage options: the one place their defaults live. Each field is read from the environment (`BLIP2_<NAME>`,
or the model's `env_prefix`, e.g. `BLIP2_T5_` for the FlanT5 models), else from a `config.pbtxt` parameter of
that name (only where a model differs from the default), else the default here. README's options table is
generated from the fields' descriptions (`python -m blip2_triton.generated --write`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .logs import LOG_FORMATS

DTYPES = ("auto", "float16", "bfloat16", "float32")
DEVICES = ("auto", "cuda", "cpu")
QUANTIZATIONS = ("none", "8bit", "4bit")
FAMILIES = ("opt", "t5")
SCHEDULERS = ("inflight", "static")
AUTO_ON_OFF = ("auto", "on", "off")
ON_OFF = ("on", "off")
# Environment wins over config.pbtxt so one repository serves the tiny model in tests and a real checkpoint in a
# container; the FlanT5 and retrieval models' prefixes let several checkpoints be served side by side.
DEFAULT_ENV_PREFIX = "BLIP2_"
T5_ENV_PREFIX = "BLIP2_T5_"
ITM_ENV_PREFIX = "BLIP2_ITM_"
BENCHMARK = "docs/BENCHMARK.md"


def env_var(name: str, prefix: str = DEFAULT_ENV_PREFIX) -> str:
    return prefix + name.upper()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blip2-triton"


def option(default: Any, help: str, *, shown: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "shown": shown})


@dataclass(frozen=True)
class ServerOptions:
    model_id: str = option("", "HF repo id (through `HF_HOME`; `HF_HUB_OFFLINE=1` on air-gapped nodes) or local "
                           "checkpoint directory", shown="empty: the embedded default (`tiny_family`)")
    dtype: str = option("auto", "`auto` (float16 on GPU, float32 on CPU), `float16`, `bfloat16`, `float32`")
    device: str = option("auto", "`auto` (CUDA when visible), `cuda`, `cuda:N`, `cpu`; an instance group of kind "
                         "`KIND_GPU` runs each instance on the GPU Triton assigns it instead")
    quantization: str = option("none", "`none`, `8bit`, `4bit` (bitsandbytes: the GPU image has it; elsewhere the "
                               "load fails saying so)")
    cache_dir: str = option("", "where the tiny model is generated (a staging directory a killed generator left "
                            "is removed after 10 min)", shown="`~/.cache/blip2-triton`")
    default_max_tokens: int = option(30, "`max_tokens` when a request sends none")
    max_max_tokens: int = option(256, "largest accepted `max_tokens`")
    max_image_bytes: int = option(20 * 1024 * 1024, "largest accepted encoded image", shown="20 MiB")
    max_image_pixels: int = option(24_000_000, "largest accepted width × height (from the header, before decoding):"
                                   " 24 MP covers phone photos and most cameras; BLIP-2 sees 224 px anyway",
                                   shown="24 M")
    max_request_pixels: int = option(100_000_000, "largest width × height summed over the rows of one request",
                                     shown="100 M")
    decode_threads: int = option(0, "vision stage: threads decoding images beside the model; `0`: the usable cores, "
                                 "2 to 8", shown="`0` (automatic)")
    max_prompt_tokens: int = option(256, "longest accepted prompt, in text tokens")
    max_beam_width: int = option(8, "largest accepted `beam_width`")
    tiny_family: str = option("opt", "embedded default served when `model_id` is empty: `opt`, the trained scenes "
                              "BLIP-2 shipped in the package (`blip2_triton.scenes`); `t5`, a generated random-weight "
                              "tiny FlanT5")
    scheduler: str = option("inflight", "`inflight`: sequences join and leave the running batch at every decoding "
                            f"step; `static`: each Triton batch generates to completion ([comparison]({BENCHMARK}"
                            "#run-at-99b4a2d-and-where-the-compute-goes-latest))")
    max_active_sequences: int = option(64, "sequences decoding at once; more wait in the engine's queue")
    max_kv_tokens: int = option(65536, "KV-cache budget: prompt + `max_tokens` positions summed over active "
                                "sequences (`blip2_kv_cache_bytes` reports the buffers' size)")
    embedding_cache_bytes: int = option(256 * 1024 * 1024, "vision stage's image-embedding cache (LRU, keyed by the "
                                        "image bytes; blip2_triton.embedding_cache); `0` disables it", shown="256 MiB")
    features_cache_bytes: int = option(-1, "retrieval image stage's ViT-feature cache (what `blip2_match` reads; "
                                       "LRU, keyed by the image bytes); `-1`: as `embedding_cache_bytes`, `0` "
                                       "disables it")
    compute_lock: str = option("auto", "`on`: stage processes take turns for forward passes, each on all cores; "
                               "`auto`/`off`: they overlap, on CPU each on its share of the cores ([comparison]("
                               f"{BENCHMARK}#packed-weights-and-cores-split-between-the-stages-d1b5313-03f4e72))")
    compute_lock_file: str = option("", "lock file the stage processes of a host share",
                                    shown="`blip2-triton-compute-<uid>.lock` in the temp directory")
    cuda_graphs: str = option("off", "fixed buffers, replayed from CUDA graphs on a GPU: the LLM stage's decoding "
                              "steps (OPT checkpoints) and the vision stage's forward per batch bucket (1, 2, 4, ..., "
                              "32 images, a batch padded up to its bucket). `auto`: on for CUDA, float16/bfloat16, not "
                              "quantized; `on`: also the fixed-buffer path on CPU (eager), refuse to start where it "
                              "cannot apply; `off` (default until measured on a GPU)")
    cudnn_attention: str = option("off", "LLM stage on CUDA, process-wide: `on` lets PyTorch pick cuDNN attention, "
                                  "slow with the in-flight batch's shape changing every step ([GPU check]("
                                  f"{BENCHMARK}#gpu-check-benchgpu_checkpy))")
    packed_weights: str = option("auto", "CPU stages: linear layers on weights packed once for oneDNN (checked at "
                                 "load; a second copy of the weights in memory). `auto`: wherever it applies; `on`: "
                                 "refuse to start where it cannot; `off`")
    cpu_threads: int = option(0, "torch threads per CPU stage process. `0`: the usable cores (affinity, cgroup "
                              "quota) shared by `cpu_stages`, or all with `compute_lock=on`; a set "
                              "`OMP_NUM_THREADS` is kept", shown="`0` (automatic)")
    cpu_stages: int = option(2, "computing stage processes sharing the host's cores (vision + LLM; unless set, "
                             "`serve` counts 2 more with `--t5` and 3 more with `--itm`)")
    log_format: str = option("text", "stage processes' log lines: `text`, or `json` (one object per line, the "
                             "request id as a field)")
    allow_pickle: bool = option(False, "`1`: also load pickle (`.bin`) weights, which can run code while loading: "
                                "only for checkpoints you trust", shown="`0`")

    def validate(self) -> None:
        for name, allowed in (
            ("dtype", DTYPES), ("quantization", QUANTIZATIONS), ("tiny_family", FAMILIES),
            ("scheduler", SCHEDULERS), ("compute_lock", AUTO_ON_OFF), ("cudnn_attention", ON_OFF),
            ("cuda_graphs", AUTO_ON_OFF), ("packed_weights", AUTO_ON_OFF), ("log_format", LOG_FORMATS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigurationError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigurationError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}")
        for name in ("default_max_tokens", "max_max_tokens", "max_image_bytes", "max_image_pixels",
                     "max_request_pixels", "max_prompt_tokens", "max_beam_width", "max_active_sequences",
                     "max_kv_tokens", "cpu_stages"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.features_cache_bytes < -1:
            raise ConfigurationError(
                f"features_cache_bytes must be >= -1 (-1: as embedding_cache_bytes), got {self.features_cache_bytes}")
        for name in ("cpu_threads", "decode_threads"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name} must be >= 0 (0: automatic), got {getattr(self, name)}")
        if self.default_max_tokens > self.max_max_tokens:
            raise ConfigurationError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_max_tokens "
                                     f"({self.max_max_tokens})")

    @classmethod
    def resolve(cls, parameters: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
                ) -> ServerOptions:
        parameters = parameters or {}
        env = os.environ if env is None else env
        prefix = parameters.get("env_prefix") or DEFAULT_ENV_PREFIX
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = (env.get(env_var(f.name, prefix)) or parameters.get(f.name) or "").strip()
            if not raw:
                continue
            if f.type == "int":
                try:
                    values[f.name] = int(raw)
                except ValueError as e:
                    raise ConfigurationError(f"{f.name} must be an integer, got {raw!r}") from e
            elif f.type == "bool":
                if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ConfigurationError(f"{f.name} must be 1 or 0, got {raw!r}")
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            else:
                values[f.name] = raw
        options = cls(**values)  # type: ignore[arg-type]
        options.validate()
        return options

    def on_instance(self, kind: str, device_id: int | str) -> ServerOptions:
        """These options for a model instance Triton placed: a KIND_GPU instance runs on the GPU Triton gave it,
        whatever `device` says; any other kind keeps `device`."""
        return replace(self, device=f"cuda:{int(device_id)}") if kind.upper() == "GPU" else self

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """(variable, default, meaning) of every option, for README's table."""
        return [(env_var(f.name), f.metadata["shown"] or f"`{f.default}`", f.metadata["help"]) for f in fields(cls)]

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
