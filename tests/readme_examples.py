"""The README's tested examples: a fenced block after a `<!-- tested example -->` line.

A `console` block holds `$ ` commands (a line ending in a backslash, or inside an open quote, continues on the
next) each followed by its output; a `python` block is a script whose output is the `text` block right after it.
In an expected output `...` stands for any text (ids, timestamps)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

MARKER = "<!-- tested example -->"
FENCE = re.compile(r"```(\w+)\n(.*?)```\n?", re.S)


@dataclass(frozen=True)
class Example:
    kind: str  # "console" (a bash command) or "python" (a script)
    code: str
    expected: str
    line: int  # README line of the command or block, for failure messages


def _complete(command: str) -> bool:
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command)
    except ValueError:  # an open quote: a JSON body spread over lines
        return False
    return True


def _console(body: str, line: int) -> list[Example]:
    examples: list[Example] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            raise ValueError(f"README line {line + i}: expected a '$ ' command, got {lines[i]!r}")
        start, command = i, lines[i][2:]
        i += 1
        while not _complete(command) and i < len(lines):
            command += "\n" + lines[i]
            i += 1
        output: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        examples.append(Example("console", command, "\n".join(output).strip(), line + start))
    return examples


def parse(readme: str) -> list[Example]:
    examples: list[Example] = []
    pos = 0
    while (at := readme.find(MARKER, pos)) >= 0:
        fence = FENCE.match(readme, at + len(MARKER) + 1)
        if fence is None:
            raise ValueError(f"README line {readme.count(chr(10), 0, at) + 1}: no fenced block after the marker")
        kind, body = fence.groups()
        line = readme.count("\n", 0, fence.start()) + 2
        pos = fence.end()
        if kind == "console":
            examples += _console(body, line)
        elif kind == "python":
            output = FENCE.match(readme, pos)
            if output is None or output.group(1) != "text":
                raise ValueError(f"README line {line}: a tested python block needs a text block after it")
            examples.append(Example("python", body, output.group(2).strip(), line))
            pos = output.end()
        else:
            raise ValueError(f"README line {line}: tested blocks are console or python, got {kind}")
    return examples


def matches(expected: str, actual: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, actual.strip(), re.S) is not None
