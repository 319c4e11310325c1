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


class FakeMetric:
    live: ClassVar[list[weakref.ref[Any]]] = []

    def __init__(self, labels: dict[str, str], buckets: list[float] | None = None) -> None:
        self.labels, self.values = labels, []
        FakeMetric.live.append(weakref.ref(self))

    def increment(self, value: float) -> None:
        self.values.append(value)

    set = observe = increment


class FakeFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> FakeMetric:
        return FakeMetric(labels, buckets)


class MeteredModel(Model):
    def initialize(self, args: dict[str, Any]) -> None:
        from blip2_triton.serving.metrics import MetricSet, add_engine_metrics, engine_observer

        self.metrics = MetricSet(self.pb, {"model": "probe"})
        add_engine_metrics(self.metrics)
        self.metric_sets = [self.metrics]
        self.observer = engine_observer(self.metrics)


def test_unloading_destroys_the_metrics_even_while_a_thread_holds_the_model(monkeypatch) -> None:
    # A thread still running at unload (a long beam search on the engine's worker) keeps the model alive; its
    # metrics must still die in finalize, and its later updates must not reach them.
    pb = types.ModuleType("triton_python_backend_utils")
    pb.MetricFamily = FakeFamily  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    wrapper = python_model(MeteredModel)()
    wrapper.initialize({})
    held = wrapper.impl
    held.observer.on_active(3, 1)
    assert [m().values for m in FakeMetric.live if m() and m().values] == [[3], [1]]
    wrapper.finalize()
    assert all(m() is None for m in FakeMetric.live), "a metric outlived finalize"
    held.observer.on_step(2, 2)  # the thread goes on: dropped, no crash
