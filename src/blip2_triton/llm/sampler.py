"""Next-token choice with per-sequence controls: greedy rows take the arg-max, sampled rows draw from their own
seeded generator with HF's processors in HF's order, so a request's tokens do not depend on its neighbours."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..errors import InvalidRequestError
from ..requests import GenerationRequest
from .sequence import Sequence


def sampling_overflow(request: GenerationRequest) -> InvalidRequestError:
    return InvalidRequestError(
        f"temperature: sampling overflowed float32 with temperature={request.temperature}, "
        f"repetition_penalty={request.repetition_penalty}; expected settings whose logits stay finite"
    )


class Sampler:
    def __init__(self, default_repetition_penalty: float | None = None) -> None:
        # The checkpoint's generation config may set one; a request's own value replaces it.
        self.default_repetition_penalty = default_repetition_penalty

    def penalty(self, request: GenerationRequest) -> float | None:
        penalty = request.repetition_penalty
        penalty = penalty if penalty is not None else self.default_repetition_penalty
        return penalty if penalty is not None and penalty != 1.0 else None

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token per row of `logits`; a row whose sampling overflows gets `error` set instead. Rows with their
        own processing queue it on the logits' device and are read back together: a read per row would wait for the
        device once per row and step."""
        # One arg-max over the whole batch serves every plain greedy row; only rows with their own processing pay
        # for a pass of their own (per-row Python work dominates small models' steps).
        chosen = logits.argmax(-1)
        drawn: list[tuple[int, torch.Tensor]] = []  # (row, probabilities on the device) of each sampled row
        for pos, seq in enumerate(seqs):
            req = seq.request
            penalty = self.penalty(req)
            if penalty is None and not req.do_sample:
                continue
            scores = logits[pos].float().unsqueeze(0)
            if penalty is not None:
                # Copied without waiting: a blocking host-to-device copy syncs the device.
                history = torch.tensor([seq.prompt_ids + seq.generated]).to(scores.device, non_blocking=True)
                scores = RepetitionPenaltyLogitsProcessor(penalty)(history, scores)
            if not req.do_sample:
                chosen[pos] = scores.argmax(-1)[0]
                continue
            if req.temperature is not None and req.temperature != 1.0:
                scores = TemperatureLogitsWarper(req.temperature)(None, scores)
            if req.top_k:
                scores = TopKLogitsWarper(top_k=req.top_k)(None, scores)
            if req.top_p is not None and req.top_p < 1.0:
                scores = TopPLogitsWarper(top_p=req.top_p)(None, scores)
            drawn.append((pos, torch.softmax(scores, dim=-1)))
        tokens: list[int] = chosen.tolist()
        if not drawn:
            return tokens
        # Drawn on the host, from each sequence's own CPU generator, so a seed means the same on every device.
        probs = torch.cat([p for _, p in drawn]).cpu()
        for row, (pos, _) in enumerate(drawn):
            seq, these = seqs[pos], probs[row : row + 1]
            if not torch.isfinite(these).all():
                # A tiny temperature or penalty overflows float32 (HF's `generate` raises in multinomial then);
                # the request fails alone instead of taking the rest of the batch with it.
                seq.error = sampling_overflow(seq.request)
                continue
            tokens[pos] = int(torch.multinomial(these, 1, generator=seq.generator))
        return tokens
