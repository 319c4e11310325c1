"""The `TritonPythonModel` wrapper: unloading releases the model and its custom metrics before the stub exits."""

from __future__ import annotations

import gc
import sys
import types
import weakref
from typing import Any, ClassVar

from blip2_triton.serving.models import python_model


class Model:
    stage_name = "probe"
    instances: ClassVar[list[weakref.ref[Any]]] = []

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils
        Model.instances.append(weakref.ref(self))
        self.finalized = False

    def initialize(self, args: dict[str, Any]) -> None:
        # A cycle through a closure, as the stages' callbacks make: only the garbage collector frees it.
        self.callback = lambda: self

    def execute(self, requests: list[Any]) -> list[Any]:
        return []

    def finalize(self) -> None:
        self.finalized = True


def test_unloading_frees_the_model_while_the_stub_still_runs(monkeypatch) -> None:
    # Metrics destroyed after the stub released its shared memory segfault it; so the model (and its metrics)
    # must be gone when `finalize` returns, reference cycles included.
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    wrapper = python_model(Model)()
    wrapper.initialize({})
    (ref,) = Model.instances
    gc.disable()  # only finalize's own collection may free it
    try:
        wrapper.finalize()
        assert ref() is None, "the model outlived finalize"
    finally:
        gc.enable()
