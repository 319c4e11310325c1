from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from blip2_client import (
    Blip2Error,
    DeadlineExceededError,
    InvalidInputError,
    ServerUnavailableError,
    cli,
)


def test_defaults() -> None:
    args = cli.build_parser().parse_args(["caption", "a.jpg"])
    assert args.url == "localhost:8001"
    assert args.protocol is None  # grpc unless the URL says http://
    assert args.timeout_s == 60.0
    assert args.json is False
    assert args.images == ["a.jpg"]
    assert cli._controls(args) == {}


def test_connection_options_before_or_after_the_subcommand() -> None:
    parser = cli.build_parser()
    before = parser.parse_args(["--url", "h:1", "--protocol", "http", "--json", "caption", "a.jpg"])
    after = parser.parse_args(["caption", "a.jpg", "--url", "h:1", "--protocol", "http", "--json"])
    for args in (before, after):
        assert (args.url, args.protocol, args.json) == ("h:1", "http", True)


def test_url_defaults_to_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("BLIP2_URL", "http://h:8000")
    assert cli.build_parser().parse_args(["caption", "a.jpg"]).url == "http://h:8000"
    assert cli.build_parser().parse_args(["caption", "a.jpg", "--url", "h:1"]).url == "h:1"
    monkeypatch.delenv("BLIP2_URL")
    assert cli.build_parser().parse_args(["caption", "a.jpg"]).url == "localhost:8001"


def test_controls_are_parsed() -> None:
    args = cli.build_parser().parse_args(
        ["ask", "a.jpg", "what is it?", "--max-tokens", "12", "--temperature", "0.5", "--seed", "7"]
    )
    assert (args.image, args.question) == ("a.jpg", "what is it?")
    assert cli._controls(args) == {"max_tokens": 12, "temperature": 0.5, "seed": 7}


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["caption"],
        ["ask", "a.jpg"],
        ["caption", "a.jpg", "--protocol", "websocket"],
        ["caption", "a.jpg", "--max-tokens", "ten"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2


@pytest.mark.parametrize("argv", [["--help"], ["caption", "--help"], ["ask", "--help"], ["health", "--help"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    assert "--url" in capsys.readouterr().out


def test_bad_url_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--url", "http://h:1", "--protocol", "grpc", "health"])
    assert info.value.code == 2


def test_missing_image_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["caption", str(tmp_path / "nope.jpg"), "--url", "127.0.0.1:1"]) == 2
    assert "nope.jpg" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (InvalidInputError("x"), 3),
        (ServerUnavailableError("x"), 4),
        (DeadlineExceededError("x"), 5),
        (Blip2Error("x"), 1),
    ],
)
def test_exit_codes(err: Blip2Error, code: int) -> None:
    assert cli.exit_code(err) == code


class FakeBlip2Client:
    """Replaces Blip2Client inside the CLI; captions are derived from the image bytes."""

    instances: ClassVar[list[FakeBlip2Client]] = []

    def __init__(self, url: str, **options: Any) -> None:
        self.url, self.options = url, options
        self.model_name = options.get("model_name", "blip2")
        self.max_concurrency = 8
        self.calls: list[tuple[str, Any]] = []
        FakeBlip2Client.instances.append(self)

    def __enter__(self) -> FakeBlip2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def caption(self, image: bytes, **controls: Any) -> str:
        self.calls.append(("caption", controls))
        if image == b"bad":
            raise InvalidInputError("image: cannot decode image bytes")
        return f"caption of {image.decode()}\nsecond line"

    def ask(self, image: bytes, question: str, **controls: Any) -> str:
        self.calls.append(("ask", controls))
        return f"{question} -> {image.decode()}"

    def is_live(self) -> bool:
        return self.url != "down:1"

    def is_ready(self) -> bool:
        return self.url == "up:1"

    def wait_until_ready(self, timeout_s: float) -> None:
        self.calls.append(("wait", timeout_s))


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setattr(cli, "Blip2Client", FakeBlip2Client)
    FakeBlip2Client.instances = []
    paths = {}
    for name in ("cat", "dog", "bad"):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(name.encode())
        paths[name] = str(path)
    return paths


def test_one_image_prints_only_the_text_on_one_line(images: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["caption", images["cat"], "--max-tokens", "5", "--timeout-s", "3"]) == 0
    assert capsys.readouterr().out == "caption of cat second line\n"
    client = FakeBlip2Client.instances[0]
    assert client.options["timeout_s"] == 3.0
    assert client.calls == [("caption", {"max_tokens": 5})]


def test_several_images_print_path_tab_text(images: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["caption", images["cat"], images["dog"]]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{images['cat']}\tcaption of cat second line",
        f"{images['dog']}\tcaption of dog second line",
    ]


def test_json_output_is_a_list(images: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--json", "caption", images["cat"]]) == 0
    assert json.loads(capsys.readouterr().out) == [{"image": images["cat"], "text": "caption of cat\nsecond line"}]


def test_per_image_errors_keep_the_other_results(images: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["caption", images["cat"], images["bad"], "--json"]) == 3
    records = json.loads(capsys.readouterr().out)
    assert records[0]["text"] == "caption of cat\nsecond line"
    assert records[1] == {
        "image": images["bad"],
        "error": "image: cannot decode image bytes",
        "error_type": "InvalidInputError",
        "exit_code": 3,
    }
    assert cli.main(["caption", images["cat"], images["bad"]]) == 3
    captured = capsys.readouterr()
    assert captured.out == f"{images['cat']}\tcaption of cat second line\n"
    assert "image: cannot decode image bytes" in captured.err


def test_ask(images: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ask", images["cat"], "what?"]) == 0
    assert capsys.readouterr().out == "what? -> cat\n"
    assert cli.main(["ask", images["cat"], "what?", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"image": images["cat"], "question": "what?", "text": "what? -> cat"}


def test_stdin_image(
    images: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"piped")))
    assert cli.main(["caption", "-"]) == 0
    assert capsys.readouterr().out == "caption of piped second line\n"


@pytest.mark.parametrize(
    ("url", "code", "text"),
    [("up:1", 0, "ready"), ("loading:1", 4, "live, model not ready"), ("down:1", 4, "unavailable")],
)
def test_health(images: dict[str, str], capsys: pytest.CaptureFixture[str], url: str, code: int, text: str) -> None:
    assert cli.main(["health", "--url", url]) == code
    assert capsys.readouterr().out == text + "\n"
    assert cli.main(["health", "--url", url, "--json"]) == code
    record = json.loads(capsys.readouterr().out)
    assert record["ready"] is (code == 0)


def test_health_wait(images: dict[str, str]) -> None:
    assert cli.main(["health", "--url", "up:1", "--wait-s", "5"]) == 0
    assert FakeBlip2Client.instances[-1].calls == [("wait", 5.0)]


def test_server_errors_map_to_exit_codes(images: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(self: FakeBlip2Client, *args: Any, **kwargs: Any) -> str:
        raise ServerUnavailableError("connection refused")

    monkeypatch.setattr(FakeBlip2Client, "ask", unavailable)
    assert cli.main(["ask", images["cat"], "q"]) == 4


def test_client_side_control_errors_are_usage_errors(images: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from blip2_client import Blip2Client

    # The real client refuses the value before connecting (nothing listens on port 1).
    monkeypatch.setattr(cli, "Blip2Client", Blip2Client)
    assert cli.main(["ask", images["cat"], "q", "--seed", "-1", "--url", "127.0.0.1:1"]) == 2
