"""Repository text generated from code, between `>>> generated: <block>` and `<<< generated` comment lines: the
inputs the ensembles, stream front ends and LLM stages share (config.pbtxt, from `serving.tensors.LLM_INPUTS` and
`serving.control.CONTROL_INPUTS`) and README's settings tables (from `ServerOptions` and `LaunchSettings`). Whole
files too: each computing stage's `configs/gpu.pbtxt`, its config.pbtxt with KIND_GPU instances.
`python -m blip2_triton.generated --write` rewrites them; `--check` (run by a unit test) fails when a file
differs."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from .options import ServerOptions
from .serving.control import CONTROL_INPUTS
from .serving.tensors import CONTROL_DTYPES, LLM_INPUTS
from .supervisor.settings import GPU_CONFIG_NAME, PACKAGE_ROOT, LaunchSettings

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


CPU_GROUP = "instance_group [ { count: 1 kind: KIND_CPU } ]"
PER_GPU = ("instance_group [ { count: 1 kind: KIND_GPU } ]",
           "One instance on each GPU Triton sees, each on the GPU Triton assigns it (`model_instance_device_id`;\n"
           "`device` is not read): a 4-GPU node runs four.")
FIRST_GPU = ("instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]",
             "Exactly one instance, on the first GPU Triton sees: it owns the engine and the only copy of the LLM\n"
             "weights, and the stream front end's polls must reach the instance that holds their job (streams live\n"
             "in that process). The LLM scales out with replicas, not with the GPUs of a node.")
# The computing stages' GPU variants: (instance group, why), by model directory.
GPU_VARIANTS: dict[str, tuple[str, str]] = {
    "model_repository/blip2_vision": PER_GPU, "model_repository/blip2_llm": FIRST_GPU,
    "model_repository_t5/blip2_t5_vision": PER_GPU, "model_repository_t5/blip2_t5_llm": FIRST_GPU,
    "model_repository_itm/blip2_itm_vision": PER_GPU, "model_repository_itm/blip2_itm_text": PER_GPU,
    "model_repository_itm/blip2_itm_match_head": PER_GPU,
}


def gpu_variant(config: str, group: str, why: str) -> str:
    """`config` (a config.pbtxt's text) with `group`, under the comment `why`, for its one KIND_CPU instance group
    and the comment above it."""
    lines = config.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if line.strip() == CPU_GROUP]
    if len(found) != 1:
        raise ValueError(f"expected one line {CPU_GROUP!r}, found {len(found)}")
    end = start = found[0]
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    lines[start:end + 1] = [f"# {line}\n" for line in why.splitlines()] + [group + "\n"]
    header = (f"# GENERATED from ../config.pbtxt by `python -m blip2_triton.generated --write`: edit that file.\n"
              f"# Read instead of config.pbtxt when tritonserver runs with --model-config-name={GPU_CONFIG_NAME} "
              "(BLIP2_INSTANCE_KIND=gpu).\n\n")
    return header + "".join(lines)


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
    for model, (group, why) in GPU_VARIANTS.items():
        target = root / model / "configs" / f"{GPU_CONFIG_NAME}.pbtxt"
        try:
            # From the rendered source: its generated blocks as they will be after `--write`.
            expected = gpu_variant(render((root / model / "config.pbtxt").read_text(encoding="utf-8")), group, why)
        except ValueError as e:
            problems.append(f"{model}/config.pbtxt: {e}")
            continue
        if target.exists() and target.read_text(encoding="utf-8") == expected:
            continue
        if write:
            target.parent.mkdir(exist_ok=True)
            target.write_text(expected, encoding="utf-8")
        else:
            problems.append(f"{target.relative_to(root)}: out of date; run python -m blip2_triton.generated --write")
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
