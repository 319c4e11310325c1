from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

# Test helpers are plain modules beside the tests (pytest runs in importlib mode: no package __init__ files).
sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent / "integration")]

from images import sample_images as _sample_images  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from blip2_triton.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-blip2-opt")


@pytest.fixture(scope="session")
def tiny_t5_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from blip2_triton.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-t5") / "tiny-blip2-t5", family="t5")


@pytest.fixture(scope="session")
def t5_reference(tiny_t5_model_dir: Path):  # -> HFReference
    from reference import HFReference

    return HFReference(tiny_t5_model_dir)


@pytest.fixture(scope="session")
def sample_images() -> dict[str, bytes]:
    return _sample_images()


@pytest.fixture(scope="session")
def hf_reference(tiny_model_dir: Path):  # -> HFReference
    from reference import HFReference

    return HFReference(tiny_model_dir)


@pytest.fixture(scope="session")
def reference(hf_reference) -> Callable[[bytes, str | None, int], str]:
    return hf_reference


@pytest.fixture(scope="session")
def tiny_itm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from blip2_triton.tiny_itm import write_tiny_itm_model

    return write_tiny_itm_model(tmp_path_factory.mktemp("tiny-itm") / "tiny-blip2-itm")


@pytest.fixture(scope="session")
def itm_reference(tiny_itm_model_dir: Path):  # -> HFRetrievalReference
    from reference import HFRetrievalReference

    return HFRetrievalReference(tiny_itm_model_dir)


BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="session")
def import_bench() -> Iterator[Callable[[str], ModuleType]]:
    """Imports a script of `bench/` by name. The scripts are not a package: they import each other by name
    from their own directory, and dataclasses need their module registered in `sys.modules`."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCH))
