"""The installed `blip2` command end to end, as a shell script would run it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from blip2_client import vqa_prompt

pytestmark = pytest.mark.integration

BLIP2 = Path(sys.executable).with_name("blip2")
Reference = Callable[[bytes, "str | None", int], str]


def blip2(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BLIP2), *args],
        input=stdin.decode("latin-1") if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def image_files(sample_images: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-images")
    files = {}
    for name in ("rgb_jpeg", "rgba_png", "webp"):
        files[name] = root / f"{name}.img"
        files[name].write_bytes(sample_images[name])
    files["broken"] = root / "broken.jpg"
    files["broken"].write_bytes(b"not an image")
    return files


def test_caption_one_image_prints_just_the_text(
    triton_server: Any, image_files: dict[str, Path], reference: Reference
) -> None:
    path = image_files["rgb_jpeg"]
    proc = blip2("caption", str(path), "--url", triton_server.grpc_url, "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference(path.read_bytes(), None, 12) + "\n"

    # Server default max_tokens, over HTTP, options before the subcommand.
    proc = blip2("--url", triton_server.http_url, "--protocol", "http", "caption", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference(path.read_bytes(), None, 30) + "\n"


def test_caption_several_images(triton_server: Any, image_files: dict[str, Path], reference: Reference) -> None:
    paths = [image_files[n] for n in ("rgb_jpeg", "rgba_png", "webp")]
    proc = blip2("caption", *map(str, paths), "--url", triton_server.grpc_url, "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{p}\t{reference(p.read_bytes(), None, 12)}" for p in paths]

    proc = blip2("caption", *map(str, paths), "--url", triton_server.grpc_url, "--max-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"image": str(p), "text": reference(p.read_bytes(), None, 12)} for p in paths]


def test_caption_from_stdin(triton_server: Any, image_files: dict[str, Path], reference: Reference) -> None:
    data = image_files["rgba_png"].read_bytes()
    proc = subprocess.run(
        [str(BLIP2), "caption", "-", "--url", triton_server.grpc_url, "--max-tokens", "12"],
        input=data,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == reference(data, None, 12) + "\n"


def test_ask(triton_server: Any, image_files: dict[str, Path], reference: Reference) -> None:
    path = image_files["rgb_jpeg"]
    question = "what color is the car?"
    expected = reference(path.read_bytes(), vqa_prompt(question), 12)
    proc = blip2("ask", str(path), question, "--url", triton_server.grpc_url, "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"

    proc = blip2("ask", str(path), question, "--url", triton_server.http_url, "--max-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"image": str(path), "question": question, "text": expected}


def test_health(triton_server: Any) -> None:
    proc = blip2("health", "--url", triton_server.grpc_url)
    assert (proc.returncode, proc.stdout) == (0, "ready\n")
    proc = blip2("health", "--url", triton_server.http_url, "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"url": triton_server.http_url, "model": "blip2", "live": True, "ready": True}
    proc = blip2("health", "--url", triton_server.grpc_url, "--model", "no_such_model")
    assert (proc.returncode, proc.stdout) == (4, "live, model not ready\n")


def test_exit_codes(triton_server: Any, image_files: dict[str, Path]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"

    proc = blip2("caption", str(image_files["broken"]), "--url", triton_server.grpc_url)
    assert proc.returncode == 3
    assert proc.stdout == ""
    assert "broken.jpg" in proc.stderr

    proc = blip2("caption", str(image_files["rgb_jpeg"]), str(image_files["broken"]), "--url", triton_server.grpc_url)
    assert proc.returncode == 3
    assert proc.stdout.startswith(f"{image_files['rgb_jpeg']}\t")

    assert blip2("health", "--url", dead).returncode == 4
    assert blip2("caption", str(image_files["rgb_jpeg"]), "--url", dead, "--timeout-s", "5").returncode == 4
    proc = blip2(
        "caption", str(image_files["rgb_jpeg"]), "--url", triton_server.grpc_url, "--timeout-s", "0.001",
        "--max-tokens", "200",
    )  # fmt: skip
    assert proc.returncode == 5, proc.stderr
    assert blip2("caption", "/nonexistent.jpg", "--url", triton_server.grpc_url).returncode == 2
    assert blip2("caption").returncode == 2
