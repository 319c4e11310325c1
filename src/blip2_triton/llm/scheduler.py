"""Decides, per engine iteration, which sequences run, join and leave. Pure bookkeeping: no model, no thread.

The engine calls `schedule()` once per iteration: the running sequences step, admitted ones are prefilled and join
them, and sequences for HF's whole-request generation (beam search, encoder-decoder LMs) are handed out at once.
The engine reports every sequence that leaves (finished, failed, cancelled) through `finish()`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .sequence import Sequence

POLICIES = ("inflight", "static")


@dataclass(frozen=True)
class SchedulerConfig:
    # `inflight`: sequences join the running batch at every step; `static`: a batch runs until its last sequence
    # finishes before the next one is admitted (plain dynamic batching, kept as a baseline).
    policy: str = "inflight"
    max_active: int = 64
    # KV budget in positions: prompt + max_tokens of every running sequence.
    max_kv_tokens: int = 65536
    # Later arrivals admitted ahead of a waiting sequence that does not fit yet; past this, admission waits for it,
    # so a long request is not starved by a stream of short ones.
    max_overtakes: int = 16

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")


@dataclass
class SchedulerOutput:
    # Admitted this iteration: prefilled, then they join the running batch.
    prefill: list[Sequence] = field(default_factory=list)
    # Running before this iteration: each feeds its next token.
    decode: list[Sequence] = field(default_factory=list)
    # For whole-request generation, outside the running batch.
    whole: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self._overtaken: dict[int, int] = {}

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def kv_tokens(self) -> int:
        return sum(seq.budget for seq in self.running.values())

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(decode=list(self.running.values()))
        out.whole = [seq for seq in self.waiting if seq.whole]
        if out.whole:
            self.waiting = deque(seq for seq in self.waiting if not seq.whole)
        if self.config.policy == "inflight" or not self.running:
            out.prefill = self._admit()
        for seq in out.prefill:
            self.running[seq.seq_id] = seq
        return out

    def _admit(self) -> list[Sequence]:
        used, count = self.kv_tokens, len(self.running)
        admitted: list[Sequence] = []
        blocked: Sequence | None = None
        for seq in self.waiting:
            if count >= self.config.max_active:
                break
            # A sequence larger than the whole budget still runs, alone.
            fits = used + seq.budget <= self.config.max_kv_tokens or count == 0
            if not fits:
                blocked = blocked or seq
                continue
            if blocked is not None:
                if self._overtaken.get(blocked.seq_id, 0) >= self.config.max_overtakes:
                    break
                self._overtaken[blocked.seq_id] = self._overtaken.get(blocked.seq_id, 0) + 1
            admitted.append(seq)
            used += seq.budget
            count += 1
        if admitted:
            taken = {seq.seq_id for seq in admitted}
            self.waiting = deque(seq for seq in self.waiting if seq.seq_id not in taken)
            for seq_id in taken:
                self._overtaken.pop(seq_id, None)
        return admitted

    def finish(self, seqs: list[Sequence]) -> None:
        """Sequences that leave, running or still waiting (finished, failed or cancelled)."""
        gone = {seq.seq_id for seq in seqs}
        for seq_id in gone:
            self.running.pop(seq_id, None)
            self._overtaken.pop(seq_id, None)
        if any(seq.seq_id in gone for seq in self.waiting):
            self.waiting = deque(seq for seq in self.waiting if seq.seq_id not in gone)
