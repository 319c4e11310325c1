"""OpenAI request parsing and validation, the chat -> BLIP-2 prompt mapping, image URLs and the response shapes."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from blip2_triton.errors import InvalidRequestError
from blip2_triton.front.gateway import TokenCounter, resolve_usage
from blip2_triton.front.images import data_url_bytes, host_allowed
from blip2_triton.front.openai_api import (
    ChatRequest,
    ChatRequestError,
    ImageRef,
    Message,
    Usage,
    chat_prompt,
    chunk_body,
    completion_body,
    error_body,
    sse,
)
from blip2_triton.front.triton import bytes_tensor, http_status_for, infer_request, split_bytes_tensor

VQA = "Question: {question} Answer:"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}


def user(*parts: Any) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}


def body(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "blip2", "messages": list(messages), **fields}


def prompt_of(request: dict[str, Any], template: str = VQA, history: str = "transcript") -> str | None:
    return chat_prompt(ChatRequest.from_json(request).messages, template, history)


def test_one_question_becomes_the_vqa_prompt() -> None:
    assert prompt_of(body(user("What color is the car?", IMAGE))) == "Question: What color is the car? Answer:"


def test_an_image_alone_is_a_caption() -> None:
    assert prompt_of(body(user(IMAGE))) is None
    assert prompt_of(body(user("   ", IMAGE))) is None


def test_earlier_turns_form_a_transcript() -> None:
    chat = body(
        {"role": "system", "content": "You are helpful."},  # BLIP-2 has no system prompt: left out
        user(IMAGE, "what is it?"),
        {"role": "assistant", "content": "a car"},
        user("what color?"),
        user("be brief"),  # consecutive user messages are one turn
    )
    assert prompt_of(chat) == "Question: what is it? Answer: a car Question: what color? be brief Answer:"
    assert prompt_of(chat, history="last") == "Question: what color? be brief Answer:"
    assert prompt_of(chat, template="{question}", history="last") == "what color? be brief"


def test_a_last_turn_without_text_captions_whatever_came_before() -> None:
    chat = body(user("what is it?", IMAGE), {"role": "assistant", "content": "a car"}, user(IMAGE))
    with pytest.raises(ChatRequestError, match="expected one image per request, got 2"):
        ChatRequest.from_json(chat)
    chat = body(user("what is it?", IMAGE), {"role": "assistant", "content": "a car"},
                {"role": "user", "content": []})
    assert prompt_of(chat) is None


def test_value_ranges_are_left_to_the_stages() -> None:
    # The stages validate ranges (their messages come back as 400s); the gateway checks what the tensors can hold.
    request = ChatRequest.from_json(body(user(IMAGE), max_tokens=0, temperature=-1, top_p=1.5, top_k=-1))
    assert request.controls() == {"max_tokens": 0, "temperature": -1, "top_p": 1.5, "top_k": -1}


def test_controls_map_to_the_ensemble_tensors() -> None:
    request = ChatRequest.from_json(body(user(IMAGE), max_completion_tokens=8, temperature=0.7, top_p=0.9, seed=3,
                                         top_k=5, repetition_penalty=1.1, user="ignored", stream=True,
                                         stream_options={"include_usage": True}))
    assert request.controls() == {"max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
                                  "repetition_penalty": 1.1, "seed": 3}
    assert request.stream and request.include_usage
    assert ChatRequest.from_json(body(user(IMAGE))).controls() == {}  # server defaults: greedy, 30 tokens
    assert ChatRequest.from_json(body(user(IMAGE), max_tokens=4, max_completion_tokens=4)).max_tokens == 4


@pytest.mark.parametrize(("request_body", "param", "message"), [
    (body(user("hi")), "messages", "expected one image (an image_url content part in a user message), got none"),
    (body(user(IMAGE, IMAGE)), "messages[0].content[1].image_url.url", "expected one image per request, got 2"),
    (body(user(IMAGE), n=2), "n", "not supported by BLIP-2 (one choice per request): expected null or 1, got 2"),
    (body(user(IMAGE), stop=["\n"]), "stop", 'got ["\\n"]'),
    (body(user(IMAGE), tools=[{"type": "function"}]), "tools", "not supported"),
    (body(user(IMAGE), logprobs=True), "logprobs", "not supported"),
    (body(user(IMAGE), response_format={"type": "json_object"}), "response_format", "not supported"),
    (body(user(IMAGE), max_tokens=2**31), "max_tokens", "expected an integer -2147483648..2147483647 (INT32), "
     "got 2147483648"),
    (body(user(IMAGE), max_completion_tokens=2.5), "max_completion_tokens", "(INT32), got 2.5"),
    (body(user(IMAGE), max_tokens=4, max_completion_tokens=5), "max_completion_tokens", "differs from max_tokens"),
    (body(user(IMAGE), temperature="hot"), "temperature", "expected a number, got str"),
    (body(user(IMAGE), top_p=None, repetition_penalty=[1]), "repetition_penalty", "expected a number, got list"),
    (body(user(IMAGE), seed=-1), "seed", "expected an integer 0..18446744073709551615 (UINT64), got -1"),
    (body(user(IMAGE), top_k=True), "top_k", "(INT32), got True"),
    (body(user(IMAGE), stream="yes"), "stream", "expected true or false, got str"),
    (body(user(IMAGE), {"role": "assistant", "content": "x"}), "messages[1].role",
     "expected the last message to be 'user', got 'assistant'"),
    (body({"role": "assistant", "content": [IMAGE]}, user("x")), "messages[0].content",
     "images are only read from user messages, got one in 'assistant'"),
    (body({"role": "tool", "content": "x"}), "messages[0].role", "expected one of system, developer, user, "
     "assistant, got 'tool'"),
    (body(user({"type": "input_audio"}, IMAGE)), "messages[0].content[0].type",
     "expected 'text' or 'image_url', got 'input_audio'"),
    (body(user({"type": "image_url", "image_url": {}})), "messages[0].content[0].image_url.url",
     "expected a URL string, got null"),
    (body({"role": "user", "content": 5}), "messages[0].content", "expected a string or a list of parts, got int"),
    ({"messages": [user(IMAGE)]}, "model", "expected a model id string, got null"),
    (body(), "messages", "expected a non-empty list, got list"),
    ([1], None, "expected a JSON object, got list"),
])
def test_invalid_requests_name_the_field_expected_and_actual(request_body: Any, param: str | None,
                                                             message: str) -> None:
    with pytest.raises(ChatRequestError) as info:
        ChatRequest.from_json(request_body)
    assert info.value.param == param
    assert message in str(info.value)
    assert isinstance(info.value, InvalidRequestError)  # the project's one request error type


def test_response_bodies_have_openai_shapes() -> None:
    usage = Usage(prompt_tokens=40, completion_tokens=8)
    done = completion_body("chatcmpl-1", 7, "blip2", "a red car", "length", usage)
    assert done["object"] == "chat.completion"
    assert done["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "a red car"},
                                "logprobs": None, "finish_reason": "length"}]
    assert done["usage"] == {"prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48}
    assert completion_body("c", 7, "blip2", "", "stop", None)["usage"] is None
    chunk = chunk_body("chatcmpl-1", 7, "blip2", {"content": "a"}, None, with_usage_field=True)
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert "usage" not in chunk_body("c", 7, "blip2", {}, "stop", with_usage_field=False)
    assert sse(chunk).startswith(b"data: {") and sse(chunk).endswith(b"\n\n")
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(sse(chunk)[6:]) == chunk


@pytest.mark.parametrize(("status", "kind"), [(400, "invalid_request_error"), (401, "authentication_error"),
                                              (503, "service_unavailable"), (500, "server_error")])
def test_errors_have_openai_shape(status: int, kind: str) -> None:
    assert error_body(status, "bad", param="n", code="c") == {
        "error": {"message": "bad", "type": kind, "param": "n", "code": "c"}}


def test_data_urls_are_decoded_within_the_limit() -> None:
    png = b"\x89PNG" + b"\x00" * 100

    def ref(url: str) -> ImageRef:
        return ImageRef(url, "messages[0].content[0].image_url.url")

    encoded = base64.b64encode(png).decode()
    assert data_url_bytes(ref(f"data:image/png;base64,{encoded}"), 1000) == png
    assert data_url_bytes(ref(f"data:;base64,{encoded}"), 1000) == png
    for url, message in [
        (f"data:image/png,{encoded}", "expected a base64 data URL"),
        (f"data:text/plain;base64,{encoded}", "expected an image/* media type, got 'text/plain'"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64,", "got an empty data URL"),
        (f"data:image/png;base64,{encoded}", "expected an image of at most 50 bytes, got about 105"),
    ]:
        with pytest.raises(ChatRequestError, match=re.escape(message)) as info:
            data_url_bytes(ref(url), 50)
        assert info.value.param == "messages[0].content[0].image_url.url"
    with pytest.raises(ChatRequestError, match="at most 103 bytes, got 104"):
        data_url_bytes(ref(f"data:image/png;base64,{encoded}"), 103)


def test_host_allow_list() -> None:
    hosts = ("images.example.com", "*.cdn.example.org")
    assert host_allowed("images.example.com", hosts) and host_allowed("IMAGES.example.com.", hosts)
    assert host_allowed("a.cdn.example.org", hosts) and not host_allowed("cdn.example.org", hosts)
    assert not host_allowed("images.example.com.evil.net", hosts) and not host_allowed("localhost", hosts)


def test_triton_request_carries_the_contract_tensors() -> None:
    request = infer_request("blip2_stream", "rid", b"img", "Question: x Answer:", {"max_tokens": 4, "seed": 2**63},
                            ("text_output",), stream=True)
    assert request.id == "rid" and [i.name for i in request.inputs] == ["image", "text_input", "max_tokens", "seed"]
    assert [i.datatype for i in request.inputs] == ["BYTES", "BYTES", "INT32", "UINT64"]
    assert split_bytes_tensor(request.raw_input_contents[0]) == [b"img"]
    assert int.from_bytes(request.raw_input_contents[3], "little") == 2**63
    assert request.parameters["triton_enable_empty_final_response"].bool_param
    assert split_bytes_tensor(bytes_tensor(b"", b"ab")) == [b"", b"ab"]


@pytest.mark.parametrize(("code", "message", "status"), [
    (grpc.StatusCode.INVALID_ARGUMENT, "in ensemble 'blip2', image: corrupt", 400),
    (grpc.StatusCode.INVALID_ARGUMENT, "Stub process 'blip2_vision_0_0' is not healthy.", 503),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect", 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", 504),
    (grpc.StatusCode.INTERNAL, "vision stage failed; see server log", 500),
    (None, "image: bytes are not a supported image file", 400),
    (None, "text_input + max_tokens: expected at most 512 positions", 400),
    (None, "llm stage failed; see server log", 500),
])
def test_triton_errors_map_to_http_statuses(code: grpc.StatusCode | None, message: str, status: int) -> None:
    assert http_status_for(code, message) == status


def test_message_texts_are_joined_and_stripped() -> None:
    message = ChatRequest.from_json(body({"role": "user", "content": [
        {"type": "text", "text": "  what "}, IMAGE, {"type": "text", "text": "color? "}]})).messages[0]
    assert message == Message("user", "what color?", (ImageRef("data:image/png;base64,QUJD",
                                                               "messages[0].content[1].image_url.url"),))


def test_usage_prefers_what_the_ensemble_reports(tiny_model_dir: Path) -> None:
    counter = TokenCounter(str(tiny_model_dir))
    assert counter.query_tokens == 8  # the tiny checkpoint's num_query_tokens
    prompt = "Question: what is it? Answer:"
    reported = {"num_output_tokens": np.array([7], dtype=np.int32), "finish_reason": [b"length"]}
    assert resolve_usage(reported, counter, prompt, "ignored", 7) == (Usage(counter.prompt_tokens(prompt), 7), "length")
    reported["num_input_tokens"] = np.array([41], dtype=np.int32)
    assert resolve_usage(reported, counter, prompt, "ignored", 7) == (Usage(41, 7), "length")
    # Without a tokenizer the reported finish reason still counts; usage needs both counts.
    assert resolve_usage({"finish_reason": [b"length"]}, None, prompt, "x", None) == (None, "length")


def test_usage_falls_back_to_the_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    alone = tmp_path / "tokenizer.json"
    alone.write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    counter = TokenCounter(str(alone))  # no config.json beside it: the query tokens are unknown
    text = "a red car on a road"
    tokens = counter.completion_tokens(text)
    assert tokens > 0 and counter.query_tokens == 0
    assert resolve_usage({}, counter, None, text, tokens + 1) == (Usage(counter.prompt_tokens(None), tokens), "stop")
    assert resolve_usage({}, counter, None, text, tokens)[1] == "length"  # reached max_tokens
    assert resolve_usage({}, None, None, text, None) == (None, "stop")
