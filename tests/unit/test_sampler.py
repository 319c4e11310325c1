"""The sampler's reads of the device: on a GPU each read of a device tensor on the host waits for the device, so a
step's per-row controls must not cost one wait per row (issue 21: one read per step, the new tokens)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from blip2_triton.llm.sampler import Sampler
from blip2_triton.llm.sequence import Sequence
from blip2_triton.requests import GenerationRequest

VOCAB = 64


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one on the GPU: what is computed from it stays "on the device", and each read of
    it on the host (`cpu`, `tolist`, `item`, `int`, `bool`, ...) is counted."""

    reads: ClassVar[list[str]] = []

    def _read(self, name: str) -> Any:
        OnDevice.reads.append(name)
        return getattr(self.as_subclass(torch.Tensor), name)

    def cpu(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return self._read("cpu")(*args, **kwargs)

    def tolist(self) -> Any:  # type: ignore[override]
        return self._read("tolist")()

    def item(self) -> Any:  # type: ignore[override]
        return self._read("item")()

    def numpy(self, *args: Any, **kwargs: Any) -> np.ndarray:  # type: ignore[override]
        return self._read("numpy")(*args, **kwargs)

    def __int__(self) -> int:
        return int(self._read("item")())

    def __float__(self) -> float:
        return float(self._read("item")())

    def __bool__(self) -> bool:
        return bool(self._read("item")())

    def __index__(self) -> int:
        return int(self._read("item")())


def _seq(**controls: Any) -> Sequence:
    request = GenerationRequest(query_embeds=np.zeros((1, 1), dtype=np.float32), max_tokens=8, **controls)
    generator = torch.Generator().manual_seed(controls["seed"]) if "seed" in controls else None
    return Sequence(request=request, prompt_ids=[3, 5, 7, 5], generated=[9, 11], generator=generator)


def _batch() -> list[Sequence]:
    return [
        _seq(),
        _seq(temperature=1.5, seed=1),
        _seq(repetition_penalty=1.3),
        _seq(temperature=0.8, top_p=0.9, seed=2),
        _seq(),
        _seq(top_k=5, repetition_penalty=1.2, seed=3),
        _seq(repetition_penalty=2.0),
        _seq(temperature=1e-38, seed=4),  # overflows float32: this row alone fails
    ]


def _logits() -> torch.Tensor:
    return torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0)) * 4


def test_rows_with_their_own_controls_are_read_back_together() -> None:
    OnDevice.reads = []
    tokens = Sampler().sample(_batch(), _logits().as_subclass(OnDevice))
    assert len(tokens) == 8 and all(isinstance(t, int) for t in tokens)
    # The arg-max of every row, then the sampled rows' probabilities: two reads, not one per row.
    assert OnDevice.reads == ["tolist", "cpu"], OnDevice.reads


def test_a_row_samples_the_same_in_a_batch_as_alone() -> None:
    logits = _logits()
    batch = _batch()
    together = Sampler().sample(batch, logits)
    alone = []
    for pos, seq in enumerate(_batch()):
        alone.append(Sampler().sample([seq], logits[pos : pos + 1])[0])
        assert (seq.error is None) == (batch[pos].error is None)
    assert together == alone
    assert [seq.error is not None for seq in batch] == [False] * 7 + [True]
    # The penalised greedy rows take the penalised arg-max, not the plain one.
    penalised = logits[6].clone()
    for token in {3, 5, 7, 9, 11}:
        penalised[token] = penalised[token] * 2.0 if penalised[token] < 0 else penalised[token] / 2.0
    assert together[6] == int(penalised.argmax())
