"""CUDA-graph semantics on CPU, for tests of the code that captures and replays graphs. A capture records the ATen
ops the step dispatches (with the very tensors and Python values it passed), and a replay re-executes exactly that
trace, as a CUDA graph re-launches its recorded kernels. Python code is not re-run at replay, so values fixed at
capture (shapes, slice bounds, Python numbers, a tensor later replaced instead of updated in place) stay fixed, as on
a GPU; a replay writes into the captured output tensors. Ops that would sync the host inside a capture (item or bool
of a tensor, nonzero, torch.tensor(data)) fail the capture; `torch.cuda.is_current_stream_capturing()` reads True
during it, as libraries see it on a GPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::lift_fresh", "aten::masked_select",
            "aten::unique_consecutive", "aten::_unique2", "aten::equal", "aten::is_nonzero"}


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.trace: list[tuple[Any, tuple[Any, ...], dict[str, Any], Any]] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func._schema.name
        if name == "aten::lift_fresh" and args and args[0].dim() == 0:
            pass  # a Python scalar written into a tensor: capturable on CUDA
        elif name in SYNC_OPS:
            self.syncs.append(name)
        elif name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in (args[1] if len(args) > 1 else ())):
            self.syncs.append(f"{name} with a boolean mask")  # a hidden nonzero on CUDA
        out = func(*args, **kwargs)
        self.trace.append((func, args, kwargs, out))
        return out


class ReplayPool:
    """Stands in for `cuda_graphs.GraphPool` on CPU (see the module's text); a capture that would sync the host
    raises, as it fails on a GPU."""

    def __init__(self, device: object = None) -> None:
        self.nbytes = 0
        self.captured: list[str] = []

    def capture(self, step: Callable[[], torch.Tensor], what: str) -> tuple[Callable[[], None], torch.Tensor]:
        self.captured.append(what)
        step()  # the side-stream warm-up GraphPool runs before capturing
        recorder = _Recorder()
        real = torch.cuda.is_current_stream_capturing
        torch.cuda.is_current_stream_capturing = lambda: True  # type: ignore[assignment]
        # Reading a tensor on the host dispatches no op on CPU, but is a device-to-host sync on CUDA.
        host_reads = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}

        def refuse(name: str) -> Any:
            def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                recorder.syncs.append(f"Tensor.{name}")
                return host_reads[name](tensor, *args, **kwargs)
            return read

        for name in host_reads:
            setattr(torch.Tensor, name, refuse(name))
        try:
            with recorder:
                out = step()
        finally:
            torch.cuda.is_current_stream_capturing = real  # type: ignore[assignment]
            for name, method in host_reads.items():
                setattr(torch.Tensor, name, method)
        if recorder.syncs:
            raise RuntimeError(f"capturing {what}: host syncs inside the capture ({', '.join(recorder.syncs)})")
        trace = recorder.trace

        def replay() -> None:
            for func, args, kwargs, recorded in trace:
                if func.is_view:
                    continue  # the recorded view aliases storage that replay updates in place
                mutable = func._schema.is_mutable
                result = func(*args, **kwargs)
                if mutable:
                    continue  # in-place / out= ops wrote into the recorded tensors themselves
                flat_new, _ = tree_flatten(result)
                flat_old, _ = tree_flatten(recorded)
                for old, new in zip(flat_old, flat_new, strict=True):
                    if isinstance(old, torch.Tensor):
                        if old.shape != new.shape:
                            raise AssertionError(f"{func}: replay shape {tuple(new.shape)} != {tuple(old.shape)}")
                        old.copy_(new)

        return replay, out

    def replay(self, graph: Callable[[], None]) -> None:
        graph()
