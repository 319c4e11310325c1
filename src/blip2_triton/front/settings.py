"""Every option of the front: one frozen dataclass, each field overridable by `BLIP2_FRONT_<FIELD>` and by a
command-line flag `--<field>` (flag > environment > default)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from ..errors import ConfigurationError
from ..logs import LOG_FORMATS

ENV_PREFIX = "BLIP2_FRONT_"
MIB = 1024 * 1024
HISTORY_MODES = ("transcript", "last")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _parse_pairs(text: str) -> dict[str, str]:
    pairs = {}
    for item in _parse_list(text):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"expected NAME=VALUE items separated by commas, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def _parse_models(text: str) -> dict[str, tuple[str, str]]:
    models = {}
    for name, value in _parse_pairs(text).items():
        plain, sep, stream = value.partition(":")
        if not sep or not plain or not stream:
            raise ValueError(f"expected ID=ENSEMBLE:STREAM_MODEL, got {name}={value}")
        models[name] = (plain, stream)
    return models


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={':'.join(v) if isinstance(v, tuple) else v}" for k, v in value.items())
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _opt(default: Any, help_text: str, parse: Callable[[str], Any] | None = None, *, secret: bool = False) -> Any:
    meta = {"help": help_text, "parse": parse, "secret": secret}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


GENERATION_MODELS = ("blip2", "blip2_stream", "blip2_t5", "blip2_t5_stream")
RETRIEVAL_MODELS = ("blip2_embed_image", "blip2_embed_text", "blip2_similarity", "blip2_match")
DEFAULT_PUBLIC_MODELS = GENERATION_MODELS + RETRIEVAL_MODELS
# Inputs a model cannot run without: checked here because Triton 2.51 answers an ensemble request that lacks one
# with "unexpected deadlock" instead of naming it.
DEFAULT_REQUIRED_INPUTS = {
    **{model: "image" for model in GENERATION_MODELS}, "blip2_embed_image": "image", "blip2_embed_text": "text_input",
    "blip2_similarity": "image+text_input", "blip2_match": "image+text_input",
}
DEFAULT_OPENAI_MODELS = {"blip2": ("blip2", "blip2_stream"), "blip2_t5": ("blip2_t5", "blip2_t5_stream")}


@dataclass(frozen=True)
class FrontSettings:
    triton_http: str = _opt("127.0.0.1:18000", "Triton's HTTP endpoint (host:port), normally on loopback")
    triton_grpc: str = _opt("127.0.0.1:18001", "Triton's gRPC endpoint (host:port), normally on loopback")
    host: str = _opt("0.0.0.0", "address the front listens on")  # noqa: S104  (the public entry point)
    http_port: int = _opt(8000, "public HTTP port: KServe v2 (/v2/...) and OpenAI (/v1/...) routes; 0 = any free")
    grpc_port: int = _opt(8001, "public gRPC port (KServe v2 GRPCInferenceService); 0 = any free port")
    metrics_port: int = _opt(8003, "Prometheus /metrics of the front; 0 = any free port, -1 = off")
    openai_port: int = _opt(-1, "a second public HTTP port with the same routes, for OpenAI clients kept apart "
                            "from KServe ones; 0 = any free port, -1 = none")
    public_models: tuple[str, ...] = _opt(
        DEFAULT_PUBLIC_MODELS, "models reachable through the front (comma-separated); every other is refused",
        _parse_list)
    openai_models: dict[str, tuple[str, str]] = _opt(  # noqa: RUF009  (_opt makes a default_factory field)
        DEFAULT_OPENAI_MODELS, "OpenAI model ids: ID=ENSEMBLE:STREAM_MODEL, comma-separated", _parse_models)
    required_inputs: dict[str, str] = _opt(  # noqa: RUF009  (_opt makes a default_factory field)
        DEFAULT_REQUIRED_INPUTS, "MODEL=INPUT[+INPUT...] pairs: inference refused (400) when an input is missing",
        _parse_pairs)
    max_request_bytes: int = _opt(64 * MIB, "largest HTTP body or gRPC message accepted")
    max_json_depth: int = _opt(32, "deepest JSON nesting accepted in a request body")
    max_inflight_bytes: int = _opt(
        256 * MIB, "request bytes in flight towards Triton at once; later requests wait for room")
    inflight_wait_s: float = _opt(30.0, "how long a request waits for room under max_inflight_bytes before 503")
    max_image_bytes: int = _opt(20 * MIB, "OpenAI routes: largest decoded image")
    image_url_hosts: tuple[str, ...] = _opt(
        (), "OpenAI routes: hosts http(s) image URLs may name ('*.example.com' allowed); empty = data: URLs only",
        _parse_list)
    image_fetch_timeout_s: float = _opt(10.0, "OpenAI routes: time limit for fetching one image URL")
    request_timeout_s: float = _opt(300.0, "time limit for one request to Triton")
    api_keys: tuple[str, ...] = _opt(
        (), "keys accepted as 'Authorization: Bearer KEY' on every route but health (comma-separated); empty = no auth",
        _parse_list, secret=True)
    prompt_template: str = _opt("Question: {question} Answer:", "OpenAI routes: how a user turn becomes a prompt")
    chat_history: str = _opt("transcript", "OpenAI routes: 'transcript' keeps earlier turns, 'last' only the last")
    tokenizers: dict[str, str] = _opt(  # noqa: RUF009  (_opt makes a default_factory field)
        {}, "OpenAI model id=checkpoint dir or tokenizer.json, for usage counts Triton does not report",
        _parse_pairs)
    usage_fallback: bool = _opt(
        True, "estimate usage and finish_reason with the tokenizer when Triton does not report them", _parse_bool)
    playground: bool = _opt(
        True, "serve the browser playground page at /playground (and redirect / there); its API calls need the API "
        "key when keys are set", _parse_bool)
    log_format: str = _opt("text", "log line format: text or json")
    log_level: str = _opt("INFO", "log level")
    access_log: bool = _opt(True, "one log line per request", _parse_bool)
    shutdown_grace_s: float = _opt(10.0, "on stop, how long requests in flight may take to finish")

    def validate(self) -> FrontSettings:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigurationError(message)

        for name in ("http_port", "grpc_port"):
            need(0 <= getattr(self, name) <= 65535, f"{name}: expected 0..65535, got {getattr(self, name)}")
        for name in ("metrics_port", "openai_port"):
            need(-1 <= getattr(self, name) <= 65535, f"{name}: expected -1..65535, got {getattr(self, name)}")
        for name in ("max_request_bytes", "max_json_depth", "max_image_bytes"):
            need(getattr(self, name) >= 1, f"{name}: expected >= 1, got {getattr(self, name)}")
        need(self.max_inflight_bytes >= self.max_request_bytes,
             f"max_inflight_bytes: expected >= max_request_bytes ({self.max_request_bytes}), "
             f"got {self.max_inflight_bytes}")
        for name in ("inflight_wait_s", "image_fetch_timeout_s", "request_timeout_s", "shutdown_grace_s"):
            need(getattr(self, name) > 0, f"{name}: expected > 0, got {getattr(self, name)}")
        need(self.log_format in LOG_FORMATS, f"log_format: expected one of {LOG_FORMATS}, got {self.log_format!r}")
        need(isinstance(logging.getLevelName(self.log_level.upper()), int),
             f"log_level: expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}")
        need(self.chat_history in HISTORY_MODES,
             f"chat_history: expected one of {HISTORY_MODES}, got {self.chat_history!r}")
        need("{question}" in self.prompt_template,
             f"prompt_template: expected a '{{question}}' placeholder, got {self.prompt_template!r}")
        try:
            self.prompt_template.format(question="")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigurationError(f"prompt_template: {e!r} in {self.prompt_template!r}") from e
        for model_id, (plain, stream) in self.openai_models.items():
            for name in (plain, stream):
                need(name in self.public_models,
                     f"openai_models: {model_id} uses {name!r}, which is not in public_models")
        unknown = set(self.tokenizers) - set(self.openai_models)
        need(not unknown, f"tokenizers: expected OpenAI model ids {sorted(self.openai_models)}, got {sorted(unknown)}")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> FrontSettings:
        """Defaults, then `BLIP2_FRONT_*` variables, then `overrides`; validated."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _convert(f.name, raw)
        values.update(overrides)
        return replace(cls(), **values).validate()


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _field(name: str) -> Any:
    return next(f for f in fields(FrontSettings) if f.name == name)


def _default(f: Any) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def _convert(name: str, raw: str) -> Any:
    f = _field(name)
    parse = f.metadata["parse"]
    default = _default(f)
    try:
        if parse is not None:
            return parse(raw)
        if isinstance(default, bool):
            return _parse_bool(raw)
        return type(default)(raw)
    except ValueError as e:
        raise ConfigurationError(f"{name} ({env_name(name)}): {e}") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option; secrets are read from the environment only (a flag would show in `ps`)."""
    for f in fields(FrontSettings):
        if f.metadata["secret"]:
            continue
        default = _default(f)
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=type(default).__name__.upper(),
            help=f"{f.metadata['help']} (default: {_show(default)!r}; env {env_name(f.name)})",
        )


def from_arguments(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> FrontSettings:
    overrides = {f.name: _convert(f.name, getattr(args, f.name)) for f in fields(FrontSettings)
                 if getattr(args, f.name, None) is not None}
    return FrontSettings.from_env(environ, **overrides)


def options_table() -> list[tuple[str, str, str, str]]:
    """(flag, environment variable, default, meaning) for every option, for docs and --help."""
    return [("(environment only)" if f.metadata["secret"] else "--" + f.name.replace("_", "-"), env_name(f.name),
             _show(_default(f)), f.metadata["help"]) for f in fields(FrontSettings)]

