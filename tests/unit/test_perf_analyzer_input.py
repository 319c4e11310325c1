"""The shipped perf_analyzer input for `blip2` matches its generator and the ensemble's inputs."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "loadtest" / "perf_analyzer" / "blip2_input.json"


def ensemble_inputs() -> dict[str, str]:
    config = (ROOT / "model_repository" / "blip2" / "config.pbtxt").read_text()
    block = config[config.index("input ["):config.index("output [")]
    return dict(re.findall(r'name: "(\w+)" data_type: TYPE_(\w+)', block))


def test_shipped_file_is_the_generators_output() -> None:
    generated = subprocess.run([sys.executable, str(SHIPPED.with_name("make_input.py"))], capture_output=True,
                               text=True, check=True, timeout=60).stdout
    assert json.loads(generated) == json.loads(SHIPPED.read_text())


def test_entries_are_valid_blip2_requests() -> None:
    inputs = ensemble_inputs()
    entries = json.loads(SHIPPED.read_text())["data"]
    assert len(entries) >= 2 and {"text_input" in e for e in entries} == {True, False}  # captions and VQA
    for entry in entries:
        assert set(entry) <= set(inputs) and "image" in entry
        raw = base64.b64decode(entry["image"]["content"]["b64"])
        (length,) = struct.unpack_from("<I", raw)
        assert length == len(raw) - 4 and entry["image"]["shape"] == [1]
        with Image.open(io.BytesIO(raw[4:])) as image:
            image.verify()
        assert inputs["max_tokens"] == "INT32" and entry["max_tokens"] == [16]
        if "text_input" in entry:
            assert inputs["text_input"] == "STRING"
            assert re.fullmatch(r"Question: .+\? Answer:", entry["text_input"][0])
