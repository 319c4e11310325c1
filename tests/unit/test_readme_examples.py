"""The README example parser: what the README-driven integration test runs and expects."""

from __future__ import annotations

import pytest
from readme_examples import matches, parse

README = """intro
<!-- tested example -->
```console
$ blip2 caption scene.png
a red circle
$ curl -s localhost:8000/v2/models/blip2/generate -d '{"image": "x",
    "max_tokens": 4}'
{"id":"...","text_output":"red"}
$ curl -s localhost:8000/v2/health/ready \\
    -o /dev/null -w '%{http_code}'
200
```

untested:
```console
$ rm -rf /
```
<!-- tested example -->
```python
print("hi")
```
```text
hi
```
"""


def test_parse_splits_commands_continuations_and_outputs() -> None:
    examples = parse(README)
    assert [(e.kind, e.expected) for e in examples] == [
        ("console", "a red circle"), ("console", '{"id":"...","text_output":"red"}'), ("console", "200"),
        ("python", "hi")]
    assert examples[1].code == ('curl -s localhost:8000/v2/models/blip2/generate -d \'{"image": "x",\n'
                                '    "max_tokens": 4}\'')
    assert examples[2].code.endswith("-o /dev/null -w '%{http_code}'")
    assert examples[0].line == 4 and examples[3].code == 'print("hi")\n'


def test_parse_refuses_blocks_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="expected a '\\$ ' command"):
        parse("<!-- tested example -->\n```console\noutput first\n```\n")
    with pytest.raises(ValueError, match="needs a text block"):
        parse("<!-- tested example -->\n```python\nprint(1)\n```\n")


def test_matches_takes_ellipsis_as_any_text() -> None:
    assert matches('{"id":"...","text_output":"red"}', '{"id":"c0ffee","text_output":"red"}\n')
    assert not matches('{"id":"...","text_output":"red"}', '{"id":"c0ffee","text_output":"blue"}')
    assert matches("a\n...\nz", "a\nb\nc\nz")
