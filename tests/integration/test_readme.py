"""The README's tested examples (curl, the CLI, the Python client, the OpenAI SDK) run against the real server: a
tritonserver serving the embedded default behind an in-process front, what `blip2-triton serve` gives. Each must
print what the README shows. `make demo` is run too, on the Quick start's scene, and must print what it shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from readme_examples import Example, matches, parse
from triton_helpers import front_settings

from blip2_triton.front import Front

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
EXAMPLES = parse(README)
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")


@pytest.fixture(scope="module")
def front(default_server: Any) -> Iterator[Front]:
    with Front(front_settings(default_server, metrics_port=-1)) as running:
        yield running


def localized(code: str, front: Front) -> str:
    """The README's default ports, pointed at this test's front."""
    return code.replace("localhost:8000", front.http_url.removeprefix("http://")).replace("localhost:8001",
                                                                                        front.grpc_url)


def environment(front: Front) -> dict[str, str]:
    # The venv's `blip2` and `python` first; the CLI's default address is the README's localhost:8001.
    return os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                         "BLIP2_URL": front.grpc_url}


def test_the_readme_shows_every_way_of_calling_it() -> None:
    commands = [e.code for e in EXAMPLES if e.kind == "console"]
    assert sum(c.startswith("curl") for c in commands) >= 5
    assert sum(c.startswith("blip2 ") for c in commands) >= 3
    for endpoint in ("/generate ", "/generate_stream ", "/infer ", "/v1/chat/completions "):
        assert any(endpoint in c for c in commands), endpoint
    scripts = [e.code for e in EXAMPLES if e.kind == "python"]
    assert any("blip2_client" in s for s in scripts) and any("from openai import OpenAI" in s for s in scripts)


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"line{e.line}" for e in EXAMPLES])
def test_readme_example(example: Example, front: Front) -> None:
    if example.kind == "python":
        run = subprocess.run([sys.executable, "-c", localized(example.code, front)], cwd=ROOT,
                             env=environment(front), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        output = run.stdout
    else:
        # Shell variables set by earlier commands (IMG=...) hold for the later ones, as in one terminal.
        earlier = [e.code for e in EXAMPLES
                   if e.kind == "console" and ASSIGNMENT.match(e.code) and e.line < example.line]
        script = "\n".join(["set -e", *earlier, localized(example.code, front)])
        run = subprocess.run(["bash", "-c", script], cwd=ROOT, env=environment(front), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=300)
        output = run.stdout
    assert matches(example.expected, output), \
        f"README line {example.line}:\n{example.code}\n--- README shows\n{example.expected}\n--- it printed\n{output}"


def test_make_demo_prints_the_quick_starts_answers() -> None:
    quick_start = README[README.index("## Quick start"):README.index("## Calling it")]
    shown = quick_start[quick_start.index("\nscene: "):quick_start.index("$ make test")].strip().splitlines()
    seed = re.search(r"\(seed (\d+)\)", shown[0])
    assert seed is not None and len(shown) >= 4
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--seed", seed.group(1)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    printed = run.stdout.splitlines()
    assert printed[printed.index(next(p for p in printed if p.startswith("scene: "))) + 1:] == shown[1:]
    assert not [line for line in printed + run.stderr.splitlines() if "ERROR" in line]
