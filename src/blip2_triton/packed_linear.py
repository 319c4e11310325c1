"""CPU linear layers with weights pre-packed for oneDNN, the way PyTorch's own CPU compiler freezes them.

`nn.Linear` on CPU hands the weight to a GEMM that re-packs it into the kernel's blocked layout on every call.
For the small row counts of decoding that packing dominates the step (figures: docs/BENCHMARK.md).

The packed kernel rounds differently from `F.linear` (about 1e-6 relative), the same kind of float noise as
batching itself: `F.linear` gives a row other bits at different row counts.

Memory: the packed copy comes on top of the dense weight, which stays: HF code reads layers' weights (dtype
checks, tied embeddings), and a placeholder in its place is not safe (`F.linear` on a CPU input and a `meta` weight
returns uninitialised memory instead of failing). Weights are frozen after load: the packed copy does not follow
later changes to `weight`.

`torch.ops.mkldnn._linear_pointwise` and `_reorder_linear_weight` are the operators `torch.compile` emits for
frozen CPU linears; they are internal, so the packing checks itself against `F.linear` on the model's own layers
at load and leaves the model as it is when anything is off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# Relative tolerance of the load-time check: far above rounding differences (~1e-6 in float32), far below a
# wrong layout or a wrong bias (order 1).
_CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


class PackedLinear(nn.Module):
    """Drop-in for an `nn.Linear` on CPU: keeps `weight` and `bias`; the forward pass uses the packed copy."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.train(linear.training)
        with torch.no_grad():
            # A plain attribute, not a buffer: an opaque oneDNN tensor has no place in state_dict or `.to()`.
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packable(module: nn.Module) -> bool:
    # Exact type: bitsandbytes' and other quantised layers subclass nn.Linear with their own weight formats.
    if type(module) is not nn.Linear:
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype in PACKABLE_DTYPES and w.dim() == 2 and w.is_contiguous()


def _check(linear: nn.Linear, packed: PackedLinear) -> str | None:
    """None when the packed layer computes what the linear does; otherwise why not."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, linear.in_features, generator=generator).to(linear.weight.dtype)
    with torch.inference_mode():
        want = F.linear(x, linear.weight, linear.bias).float()
        got = packed(x).float()
    if got.shape != want.shape:
        return f"packed output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    scale = want.abs().max().item() or 1.0
    err = (got - want).abs().max().item() / scale
    if not err <= _CHECK_RTOL[linear.weight.dtype]:
        return f"packed output differs from F.linear by {err:.2e} (relative)"
    return None


def pack_linears(model: nn.Module) -> int:
    """Replaces every packable `nn.Linear` of `model` in place; returns how many.

    Raises RuntimeError (and changes nothing) when the operators are missing or the check against `F.linear`
    fails, so callers decide whether that is fatal.
    """
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if packable(child)]
    if not targets:
        return 0
    # A linear listed under two parents is packed (and counted) once.
    unique = {id(child): child for _, _, child in targets}
    try:
        replacements = {key: PackedLinear(child) for key, child in unique.items()}  # type: ignore[arg-type]
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        raise RuntimeError(f"oneDNN weight packing is not available in this torch build ({e})") from e
    # One check per shape and dtype covers every layer of it: the packing does not depend on the values.
    checked: set[tuple[torch.Size, torch.dtype, bool]] = set()
    for child in unique.values():
        key = (child.weight.shape, child.weight.dtype, child.bias is not None)
        if key in checked:
            continue
        checked.add(key)
        problem = _check(child, replacements[id(child)])  # type: ignore[arg-type]
        if problem is not None:
            raise RuntimeError(f"oneDNN weight packing failed its check on a {tuple(child.weight.shape)} layer: "
                               f"{problem}")
    for parent, name, child in targets:
        setattr(parent, name, replacements[id(child)])
    return len(unique)
