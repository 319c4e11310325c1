from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="session")
def import_bench() -> Iterator[Callable[[str], ModuleType]]:
    """Imports a script of `bench/` by name. The scripts are not a package: they import each other by name
    from their own directory, and dataclasses need their module registered in `sys.modules`."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCH))
