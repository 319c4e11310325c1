"""Repository text generated from code, between `>>> generated: <block>` and `<<< generated` comment lines: the
inputs the ensembles, stream front ends and LLM stages share (config.pbtxt, from `serving.LLM_INPUTS` and
`serving.control.CONTROL_INPUTS`) and README's settings tables (from `ServerOptions` and `LaunchSettings`).
`python -m blip2_triton.generated --write` rewrites them; `--check` (run by a unit test) fails when a file
differs."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from .options import ServerOptions
from .serving import CONTROL_DTYPES, LLM_INPUTS
from .serving.control import CONTROL_INPUTS
from .supervisor.settings import PACKAGE_ROOT, LaunchSettings

TRITON_TYPES = {"int32": "TYPE_INT32", "float32": "TYPE_FP32", "uint64": "TYPE_UINT64"}
COMMENTS = {
    "_query_embeds": "Optional only so that stream control messages (_poll_id or _cancel_id alone) are accepted;\n"
                     "generation requires it.",
    "_job_id": "From the stream front end only: `_job_id` starts a streamed job, `_poll_id` asks for its next text,\n"
               "`_cancel_id` stops it (Triton does not pass a client's cancellation on to requests made through BLS).",
}
REGION = re.compile(r"^(?P<head>(?P<indent>[ \t]*)\S+ >>> generated: (?P<block>\w+).*\n)(?P<body>(?:.*\n)*?)"
                    r"(?P<tail>(?P=indent)\S+ <<< generated.*\n)", re.M)


def _input(name: str) -> str:
    if name in CONTROL_DTYPES:
        kind, dims = TRITON_TYPES[CONTROL_DTYPES[name][1].name], "1"
    else:
        kind, dims = ("TYPE_FP32", "-1, -1") if name == "_query_embeds" else ("TYPE_STRING", "1")
    optional = "" if name == "image" else " optional: true"
    return f'{{ name: "{name}" data_type: {kind} dims: [ {dims} ]{optional} }}'


def _inputs(names: list[str]) -> list[str]:
    lines: list[str] = []
    for i, name in enumerate(names):
        lines += [f"# {line}" for line in COMMENTS.get(name, "").splitlines()]
        lines.append(_input(name) + ("," if i < len(names) - 1 else ""))  # the text format separates with commas
    return lines


def _table(rows: list[tuple[str, str, str]], *extra: str) -> list[str]:
    return ["| variable | default | meaning |", "|---|---|---|",
            *(f"| `{name}` | {default} | {meaning} |" for name, default, meaning in rows), *extra]


BLOCKS: dict[str, Callable[[], list[str]]] = {
    "public_inputs": lambda: _inputs(["image", *(n for n in LLM_INPUTS if not n.startswith("_"))]),
    "llm_inputs": lambda: _inputs([*LLM_INPUTS, *CONTROL_INPUTS]),
    "llm_input_map": lambda: [f'input_map {{ key: "{n}" value: "{n}" }}' for n in LLM_INPUTS],
    "options": lambda: _table(ServerOptions.documented(), "| `BLIP2_T5_*` | as above | the same options for the "
                              "FlanT5 models (`BLIP2_T5_MODEL_ID`, `BLIP2_T5_DTYPE`, ...) |",
                              "| `BLIP2_ITM_*` | as above | the same options for the retrieval models "
                              "(`BLIP2_ITM_DTYPE`, `BLIP2_ITM_DEVICE`, ...; tiny default: the retrieval checkpoint) |"),
    "launch_settings": lambda: _table(LaunchSettings.documented()),
}
_OPT = {"model_repository/blip2/config.pbtxt": ("public_inputs", "llm_input_map"),
        "model_repository/blip2_stream/config.pbtxt": ("public_inputs",),
        "model_repository/blip2_llm/config.pbtxt": ("llm_inputs",)}
FILES = {**_OPT, **{p.replace("repository/blip2", "repository_t5/blip2_t5"): b for p, b in _OPT.items()},
         "README.md": ("options", "launch_settings")}


def render(text: str) -> str:
    return REGION.sub(lambda m: m["head"] + "".join(f"{m['indent']}{line}\n" for line in BLOCKS[m["block"]]())
                      + m["tail"], text)


def sync(root: Path, *, write: bool) -> list[str]:
    """What is out of date under `root` (rewritten first when `write`)."""
    problems = []
    for relative, blocks in FILES.items():
        path = root / relative
        text = path.read_text(encoding="utf-8")
        found = tuple(m["block"] for m in REGION.finditer(text))
        if found != blocks:
            problems.append(f"{relative}: generated blocks {found}, expected {blocks}")
        elif render(text) != text:
            if write:
                path.write_text(render(text), encoding="utf-8")
            else:
                problems.append(f"{relative}: out of date; run python -m blip2_triton.generated --write")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_triton.generated", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--write", action="store_true")
    parser.add_argument("--root", type=Path, default=PACKAGE_ROOT.parent.parent, help="repository checkout")
    args = parser.parse_args(argv)
    problems = sync(args.root, write=args.write)
    print("\n".join(problems) or "generated text is up to date", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
