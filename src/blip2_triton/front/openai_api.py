"""OpenAI chat completions for BLIP-2: request parsing and validation, how a chat becomes a BLIP-2 prompt, and the
response and error bodies. Pure functions; the routes that call Triton are in `gateway.py`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError

ROLES = ("system", "developer", "user", "assistant")
UINT64_MAX = 2**64 - 1
INT32_MAX = 2**31 - 1


class ChatRequestError(InvalidRequestError):
    """A chat request the gateway refuses (HTTP 400); `param` names the field at fault, as OpenAI's errors do."""

    def __init__(self, param: str | None, message: str, *, code: str | None = None) -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ImageRef:
    url: str
    param: str  # where it was in the request, for error messages


@dataclass(frozen=True)
class Message:
    role: str
    text: str  # the text parts joined by a space, stripped; "" when there are none
    images: tuple[ImageRef, ...]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _message(index: int, raw: Any) -> Message:
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise ChatRequestError(where, f"expected an object, got {_kind(raw)}")
    role = raw.get("role")
    if role not in ROLES:
        raise ChatRequestError(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
    content = raw.get("content")
    texts: list[str] = []
    images: list[ImageRef] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            part_where = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ChatRequestError(f"{part_where}.text", f"expected a string, got {_kind(text)}")
                texts.append(text)
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not isinstance(url, str) or not url:
                    raise ChatRequestError(f"{part_where}.image_url.url", f"expected a URL string, got {_kind(url)}")
                images.append(ImageRef(url, f"{part_where}.image_url.url"))
            else:
                raise ChatRequestError(
                    f"{part_where}.type", f"expected 'text' or 'image_url', got {kind!r}"
                    if isinstance(part, dict) else f"expected a content part object, got {_kind(part)}")
    elif content is not None or role == "user":
        raise ChatRequestError(f"{where}.content", f"expected a string or a list of parts, got {_kind(content)}")
    if images and role != "user":
        raise ChatRequestError(f"{where}.content", f"images are only read from user messages, got one in {role!r}")
    return Message(role, " ".join(t.strip() for t in texts if t.strip()), tuple(images))


# Fields with no BLIP-2 meaning: accepted only with their neutral value, refused otherwise so that a client
# never silently gets something other than what it asked for.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "stop": (None, [], ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens_param: str = "max_tokens"  # which of the two names the client used, for error messages

    @classmethod
    def from_json(cls, body: Any) -> ChatRequest:
        if not isinstance(body, dict):
            raise ChatRequestError(None, f"expected a JSON object, got {_kind(body)}")
        for name, neutral in _NEUTRAL.items():
            if body.get(name) not in neutral:
                hint = " (one choice per request)" if name == "n" else ""
                raise ChatRequestError(name, f"not supported by BLIP-2{hint}: expected "
                                       f"{' or '.join(json.dumps(v) for v in neutral)}, got {json.dumps(body[name])}")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ChatRequestError("model", f"expected a model id string, got {_kind(model)}")
        raw_messages = body.get("messages")
        if not isinstance(raw_messages, list) or not raw_messages:
            raise ChatRequestError("messages", f"expected a non-empty list, got {_kind(raw_messages)}")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise ChatRequestError("stream", f"expected true or false, got {_kind(stream)}")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ChatRequestError("stream_options", f"expected an object, got {_kind(options)}")
        include_usage = (options or {}).get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise ChatRequestError("stream_options.include_usage",
                                   f"expected true or false, got {_kind(include_usage)}")
        max_tokens = body.get("max_tokens")
        max_completion = body.get("max_completion_tokens")
        if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
            raise ChatRequestError("max_completion_tokens",
                                   f"differs from max_tokens ({max_tokens} vs {max_completion}); send one")
        return cls(
            model=model,
            messages=tuple(_message(i, m) for i, m in enumerate(raw_messages)),
            stream=bool(stream),
            include_usage=include_usage,
            max_tokens=max_completion if max_completion is not None else max_tokens,
            temperature=body.get("temperature"),
            top_p=body.get("top_p"),
            top_k=body.get("top_k"),
            repetition_penalty=body.get("repetition_penalty"),
            seed=body.get("seed"),
            max_tokens_param="max_completion_tokens" if max_completion is not None else "max_tokens",
        ).validate()

    def validate(self) -> ChatRequest:
        """Types and what the tensors can hold; value ranges (max_tokens 1..256, top_p in (0, 1], ...) are the
        stages' to check, whose messages come back as 400s like these."""
        for name, value, low, high, kind in (
                (self.max_tokens_param, self.max_tokens, -INT32_MAX - 1, INT32_MAX, "INT32"),
                ("top_k", self.top_k, -INT32_MAX - 1, INT32_MAX, "INT32"),
                ("seed", self.seed, 0, UINT64_MAX, "UINT64")):
            if value is not None and not (_is_int(value) and low <= value <= high):
                raise ChatRequestError(name, f"expected an integer {low}..{high} ({kind}), got {value!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise ChatRequestError(name, f"expected a number, got {_kind(value)}")
        if self.messages[-1].role != "user":
            raise ChatRequestError(f"messages[{len(self.messages) - 1}].role",
                                   f"expected the last message to be 'user', got {self.messages[-1].role!r}")
        images = [image for m in self.messages for image in m.images]
        if not images:
            raise ChatRequestError("messages", "expected one image (an image_url content part in a user message), "
                                   "got none")
        if len(images) > 1:
            raise ChatRequestError(images[1].param, f"expected one image per request, got {len(images)}")
        return self

    @property
    def image(self) -> ImageRef:
        return next(image for m in self.messages for image in m.images)

    def controls(self) -> dict[str, int | float]:
        """The `blip2` control tensors this request sets (the others keep the server's defaults)."""
        values = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "top_k": self.top_k, "repetition_penalty": self.repetition_penalty, "seed": self.seed}
        return {k: v for k, v in values.items() if v is not None}


def chat_prompt(messages: tuple[Message, ...], template: str, history: str) -> str | None:
    """The BLIP-2 prompt for a chat, or None for a caption.

    System and developer messages are left out (BLIP-2 has no system prompt). The current turn is every user
    message after the last assistant message, their texts joined by a space; if it has no text the request is a
    caption, whatever came before. Otherwise the prompt is the template applied to it, preceded with
    `history="transcript"` by each earlier turn as template + " " + the assistant's answer."""
    turns: list[tuple[str, str | None]] = []
    question: list[str] = []
    for message in messages:
        if message.role == "user":
            if message.text:
                question.append(message.text)
        elif message.role == "assistant":
            turns.append((" ".join(question), message.text))
            question = []
    current = " ".join(question)
    if not current:
        return None
    parts = []
    if history == "transcript":
        parts = [f"{template.format(question=q)} {a}".strip() for q, a in turns if q or a]
    parts.append(template.format(question=current))
    return " ".join(parts)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def completion_body(completion_id: str, created: int, model: str, text: str, finish_reason: str,
                    usage: Usage | None) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage.as_dict() if usage is not None else None,
    }


def chunk_body(completion_id: str, created: int, model: str, delta: dict[str, str], finish_reason: str | None,
               *, with_usage_field: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage_field:
        body["usage"] = None  # OpenAI's shape with include_usage: null on every chunk but the last
    return body


def usage_chunk_body(completion_id: str, created: int, model: str, usage: Usage | None) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage.as_dict() if usage is not None else None}


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 503: "service_unavailable", 504: "timeout"}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}
