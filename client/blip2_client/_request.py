from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, TypedDict

import numpy as np
import numpy.typing as npt

from ._errors import Blip2Error

Protocol = Literal["grpc", "http"]

DEFAULT_GRPC_URL = "localhost:8001"


class Controls(TypedDict, total=False):
    """Generation controls; each one left out (or None) keeps the server's default."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    beam_width: int | None
    repetition_penalty: float | None
    seed: int | None


@dataclass(frozen=True)
class _ControlSpec:
    datatype: str
    dtype: type[np.generic]
    kind: Literal["int", "float"]
    lo: int = 0
    hi: int = 0


_I32 = (-(2**31), 2**31 - 1)
CONTROL_SPECS: dict[str, _ControlSpec] = {
    "max_tokens": _ControlSpec("INT32", np.int32, "int", *_I32),
    "temperature": _ControlSpec("FP32", np.float32, "float"),
    "top_p": _ControlSpec("FP32", np.float32, "float"),
    "top_k": _ControlSpec("INT32", np.int32, "int", *_I32),
    "beam_width": _ControlSpec("INT32", np.int32, "int", *_I32),
    "repetition_penalty": _ControlSpec("FP32", np.float32, "float"),
    "seed": _ControlSpec("UINT64", np.uint64, "int", 0, 2**64 - 1),
}


def control_tensors(controls: Mapping[str, Any]) -> list[tuple[str, str, npt.NDArray[Any]]]:
    """Validate controls and return (name, Triton datatype, [1, 1] array) for those given.

    Only type and representability are checked here; value ranges (e.g. the
    server's max_tokens cap) are the server's to enforce, so its message reaches
    the caller unchanged.
    """
    unknown = sorted(set(controls) - CONTROL_SPECS.keys())
    if unknown:
        raise TypeError(
            f"unknown generation control(s) {', '.join(map(repr, unknown))}; expected any of {', '.join(CONTROL_SPECS)}"
        )
    tensors = []
    for name, spec in CONTROL_SPECS.items():
        value = controls.get(name)
        if value is None:
            continue
        # bool is an int subclass, but `seed=True` is surely a mistake.
        if isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be {spec.kind}, got bool")
        if spec.kind == "int":
            if not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be int, got {type(value).__name__}")
            if not spec.lo <= int(value) <= spec.hi:
                raise ValueError(f"{name}={value} does not fit {spec.datatype}")
            arr = np.array([[int(value)]], dtype=spec.dtype)
        else:
            if not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be float, got {type(value).__name__}")
            if not math.isfinite(float(value)):
                raise ValueError(f"{name} must be finite, got {value}")
            arr = np.array([[float(value)]], dtype=spec.dtype)
        tensors.append((name, spec.datatype, arr))
    return tensors


def vqa_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


def build_inputs(tc: ModuleType, image: bytes, prompt: str | None, controls: Mapping[str, Any]) -> list[Any]:
    """Build InferInput objects; `tc` is tritonclient.grpc or tritonclient.http (same API)."""
    tensors: list[tuple[str, str, npt.NDArray[Any]]] = [("image", "BYTES", np.array([[image]], dtype=np.object_))]
    if prompt is not None:
        tensors.append(("text_input", "BYTES", np.array([[prompt.encode("utf-8")]], dtype=np.object_)))
    tensors.extend(control_tensors(controls))
    inputs = []
    for name, datatype, arr in tensors:
        inp = tc.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def requested_outputs(tc: ModuleType) -> list[Any]:
    return [tc.InferRequestedOutput("text_output")]


@dataclass(frozen=True)
class Generation:
    """A generated text and what the server reports about it (None where a server does not report it)."""

    text: str
    # "stop": the model ended the text; "length": it reached max_tokens.
    finish_reason: str | None
    output_tokens: int | None
    # The input's positions: the image's query tokens and the prompt's tokens.
    input_tokens: int | None


def decode_generation(result: Any) -> Generation:
    def scalar(name: str) -> Any:
        out = result.as_numpy(name)
        return None if out is None or out.size == 0 else out.reshape(-1)[0]

    reason = scalar("finish_reason")
    tokens, prompt = scalar("num_output_tokens"), scalar("num_input_tokens")
    return Generation(
        text=decode_text(result),
        finish_reason=reason.decode("utf-8") if isinstance(reason, (bytes, bytearray)) else reason,
        output_tokens=int(tokens) if tokens is not None else None,
        input_tokens=int(prompt) if prompt is not None else None,
    )


def decode_text(result: Any) -> str:
    out = result.as_numpy("text_output")
    if out is None or out.size == 0:
        raise Blip2Error("server response has no text_output")
    value = out.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def parse_url(url: str, protocol: Protocol | None) -> tuple[str, Protocol, bool]:
    """Split "http://host:port" style URLs into (host:port[/path], protocol, ssl).

    tritonclient rejects schemes, but users copy URLs from browsers and configs,
    so a scheme is accepted and, when protocol is None, chooses it.
    """
    if protocol not in (None, "grpc", "http"):
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    scheme = scheme.lower()
    implied: dict[str, Protocol] = {"http": "http", "https": "http", "grpc": "grpc", "grpcs": "grpc"}
    if scheme and scheme not in implied:
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r}")
    if scheme and protocol is not None and implied[scheme] != protocol:
        raise ValueError(f"URL {url!r} does not match protocol={protocol!r}")
    chosen: Protocol = protocol or implied.get(scheme, "grpc")
    hostport = rest.rstrip("/")
    if not hostport:
        raise ValueError(f"URL {url!r} has no host")
    return hostport, chosen, scheme in ("https", "grpcs")


def batch_prompts(n: int, prompts: str | Sequence[str | None] | None, what: str) -> list[str | None]:
    if prompts is None or isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} {what}")
    return prompts


def tensor_specs(raw: Any) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(name=t["name"], datatype=t["datatype"], shape=tuple(int(d) for d in t["shape"])) for t in raw or ()
    )


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelMetadata:
        # gRPC's JSON form spells int64 shapes as strings; HTTP's uses numbers.
        return cls(
            name=str(raw.get("name", "")),
            versions=tuple(str(v) for v in raw.get("versions", ())),
            platform=str(raw.get("platform", "")),
            inputs=tensor_specs(raw.get("inputs")),
            outputs=tensor_specs(raw.get("outputs")),
        )
