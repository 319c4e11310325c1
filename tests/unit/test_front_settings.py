"""Front options: defaults, BLIP2_FRONT_* variables, command-line flags, validation; the JSON log formatter."""

from __future__ import annotations

import argparse
import io
import json
import logging

import pytest

from blip2_triton.errors import ConfigurationError
from blip2_triton.front.settings import FrontSettings, add_arguments, from_arguments, options_table
from blip2_triton.logs import JsonFormatter, configure_logging


def test_defaults_fit_real_photos() -> None:
    s = FrontSettings().validate()
    # One image may be 20 MiB at the stage (BLIP2_MAX_IMAGE_BYTES): it must fit raw and as base64 in JSON.
    assert s.max_request_bytes >= 20 * 1024 * 1024 * 4 // 3
    assert s.max_image_bytes == 20 * 1024 * 1024
    assert s.public_models == ("blip2", "blip2_stream", "blip2_t5", "blip2_t5_stream", "blip2_embed_image",
                               "blip2_embed_text", "blip2_similarity", "blip2_match")
    assert s.required_inputs["blip2_match"] == "image+text_input" and s.required_inputs["blip2"] == "image"
    assert s.openai_models == {"blip2": ("blip2", "blip2_stream"), "blip2_t5": ("blip2_t5", "blip2_t5_stream")}
    assert s.api_keys == () and s.image_url_hosts == ()


def test_environment_overrides_defaults() -> None:
    env = {
        "BLIP2_FRONT_MAX_REQUEST_BYTES": "1000",
        "BLIP2_FRONT_MAX_INFLIGHT_BYTES": "5000",
        "BLIP2_FRONT_PUBLIC_MODELS": "blip2, blip2_stream",
        "BLIP2_FRONT_OPENAI_MODELS": "opt=blip2:blip2_stream",
        "BLIP2_FRONT_API_KEYS": "k1,k2",
        "BLIP2_FRONT_ACCESS_LOG": "off",
        "BLIP2_FRONT_TOKENIZERS": "opt=/models/ckpt",
        "BLIP2_FRONT_REQUEST_TIMEOUT_S": "12.5",
        "BLIP2_FRONT_HOST": "",  # empty: the default
    }
    s = FrontSettings.from_env(env)
    assert s.max_request_bytes == 1000 and s.max_inflight_bytes == 5000
    assert s.public_models == ("blip2", "blip2_stream")
    assert s.openai_models == {"opt": ("blip2", "blip2_stream")}
    assert s.api_keys == ("k1", "k2") and s.access_log is False
    assert s.tokenizers == {"opt": "/models/ckpt"} and s.request_timeout_s == 12.5
    assert s.host == "0.0.0.0"


def test_flags_override_the_environment_and_secrets_have_no_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--http-port", "9000", "--max-json-depth", "8", "--image-url-hosts", "a.com,*.b.org"])
    s = from_arguments(args, {"BLIP2_FRONT_HTTP_PORT": "7000", "BLIP2_FRONT_GRPC_PORT": "7001"})
    assert (s.http_port, s.grpc_port, s.max_json_depth) == (9000, 7001, 8)
    assert s.image_url_hosts == ("a.com", "*.b.org")
    with pytest.raises(SystemExit):
        parser.parse_args(["--api-keys", "secret"])  # a key on the command line would show in `ps`
    flags = [row[0] for row in options_table()]
    assert "--api-keys" not in flags and "(environment only)" in flags
    assert all(row[1].startswith("BLIP2_FRONT_") for row in options_table())


@pytest.mark.parametrize(("env", "message"), [
    ({"BLIP2_FRONT_HTTP_PORT": "http"}, "http_port (BLIP2_FRONT_HTTP_PORT): invalid literal"),
    ({"BLIP2_FRONT_ACCESS_LOG": "maybe"}, "expected true or false, got 'maybe'"),
    ({"BLIP2_FRONT_OPENAI_MODELS": "opt=blip2"}, "expected ID=ENSEMBLE:STREAM_MODEL, got opt=blip2"),
    ({"BLIP2_FRONT_OPENAI_MODELS": "opt=blip2_llm:blip2_stream"},
     "openai_models: opt uses 'blip2_llm', which is not in public_models"),
    ({"BLIP2_FRONT_MAX_INFLIGHT_BYTES": "10"}, "max_inflight_bytes: expected >= max_request_bytes (67108864), got 10"),
    ({"BLIP2_FRONT_PROMPT_TEMPLATE": "Question: Answer:"}, "prompt_template: expected a '{question}' placeholder"),
    ({"BLIP2_FRONT_PROMPT_TEMPLATE": "{question} {other}"}, "prompt_template: KeyError"),
    ({"BLIP2_FRONT_CHAT_HISTORY": "all"}, "chat_history: expected one of ('transcript', 'last'), got 'all'"),
    ({"BLIP2_FRONT_LOG_FORMAT": "xml"}, "log_format: expected one of ('text', 'json'), got 'xml'"),
    ({"BLIP2_FRONT_LOG_LEVEL": "loud"}, "log_level: expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got 'loud'"),
    ({"BLIP2_FRONT_TOKENIZERS": "gpt=/x"}, "tokenizers: expected OpenAI model ids ['blip2', 'blip2_t5'], got ['gpt']"),
    ({"BLIP2_FRONT_METRICS_PORT": "-2"}, "metrics_port: expected -1..65535, got -2"),
    ({"BLIP2_FRONT_MAX_JSON_DEPTH": "0"}, "max_json_depth: expected >= 1, got 0"),
])
def test_bad_options_are_refused_with_a_reason(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        FrontSettings.from_env(env)
    assert message in str(info.value)


def test_json_log_lines_carry_extra_fields_and_exceptions() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("json", "DEBUG", stream=stream)
        logging.getLogger("blip2_triton.test").info("served %s", "x", extra={"request_id": "r1", "status": 200})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("blip2_triton.test").exception("failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "served x" and first["level"] == "INFO" and first["logger"] == "blip2_triton.test"
    assert first["request_id"] == "r1" and first["status"] == 200 and first["ts"].endswith("+00:00")
    assert "ValueError: boom" in second["exception"]


def test_json_formatter_survives_unserialisable_fields() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.peer = object()
    assert json.loads(JsonFormatter().format(record))["peer"].startswith("<object")
    with pytest.raises(ValueError, match="log format: expected one of text, json, got 'yaml'"):
        configure_logging("yaml")
