"""The LLM scheduler alone: admission, departures and fairness, with no model and no thread."""

from __future__ import annotations

import numpy as np
import pytest

from blip2_triton.llm.scheduler import Scheduler, SchedulerConfig
from blip2_triton.llm.sequence import Sequence
from blip2_triton.requests import GenerationRequest


def seq(prompt: int = 10, max_tokens: int = 10, *, whole: bool = False) -> Sequence:
    request = GenerationRequest(query_embeds=np.zeros((1, 1), dtype=np.float32), max_tokens=max_tokens)
    return Sequence(request=request, prompt_ids=[0] * prompt, whole=whole)


def ids(seqs: list[Sequence]) -> list[int]:
    return [s.seq_id for s in seqs]


def test_admission_stops_at_the_kv_budget_and_max_active() -> None:
    scheduler = Scheduler(SchedulerConfig(max_active=3, max_kv_tokens=100))
    a, b, c, d = seq(20, 20), seq(20, 20), seq(10, 10), seq(5, 5)
    for s in (a, b, c, d):
        scheduler.add(s)
    out = scheduler.schedule()
    # 40 + 40 fit, c (20) would make 100: fits exactly; d is past max_active.
    assert ids(out.prefill) == ids([a, b, c]) and out.decode == []
    assert ids(scheduler.waiting) == ids([d])
    assert scheduler.kv_tokens == 100
    out = scheduler.schedule()
    assert ids(out.decode) == ids([a, b, c]) and out.prefill == []


def test_a_short_sequence_leaves_before_a_long_one_and_frees_its_place() -> None:
    scheduler = Scheduler(SchedulerConfig(max_active=2))
    long, short, later = seq(10, 200), seq(10, 4), seq(10, 4)
    for s in (long, short, later):
        scheduler.add(s)
    assert ids(scheduler.schedule().prefill) == ids([long, short])
    scheduler.finish([short])
    out = scheduler.schedule()
    assert ids(out.decode) == ids([long]) and ids(out.prefill) == ids([later])


def test_cancelled_sequences_leave_from_the_queue_and_the_batch() -> None:
    scheduler = Scheduler(SchedulerConfig(max_active=1))
    running, waiting, next_one = seq(), seq(), seq()
    for s in (running, waiting, next_one):
        scheduler.add(s)
    scheduler.schedule()
    scheduler.finish([running, waiting])
    assert not scheduler.running
    assert ids(scheduler.schedule().prefill) == ids([next_one])


def test_a_failed_row_leaves_alone() -> None:
    scheduler = Scheduler()
    rows = [seq() for _ in range(4)]
    for s in rows:
        scheduler.add(s)
    scheduler.schedule()
    scheduler.finish([rows[1]])
    assert ids(scheduler.schedule().decode) == ids([rows[0], rows[2], rows[3]])


def test_a_long_waiting_request_is_not_starved_by_short_ones() -> None:
    scheduler = Scheduler(SchedulerConfig(max_active=64, max_kv_tokens=100, max_overtakes=3))
    occupant = seq(30, 30)
    scheduler.add(occupant)
    scheduler.schedule()
    big = seq(30, 30)  # does not fit beside the occupant
    scheduler.add(big)
    overtook = 0
    for _ in range(10):
        small = seq(2, 2)
        scheduler.add(small)
        out = scheduler.schedule()
        overtook += len(out.prefill)
        # Every small one admitted finishes at once; the occupant keeps running.
        scheduler.finish(out.prefill)
    assert overtook == 3, "later arrivals overtake a blocked sequence only max_overtakes times"
    scheduler.finish([occupant])
    out = scheduler.schedule()
    assert ids(out.prefill)[0] == big.seq_id, "once room frees, the blocked sequence goes first"


def test_a_sequence_larger_than_the_budget_runs_alone() -> None:
    scheduler = Scheduler(SchedulerConfig(max_kv_tokens=50))
    huge, small = seq(40, 40), seq(5, 5)
    scheduler.add(huge)
    scheduler.add(small)
    assert ids(scheduler.schedule().prefill) == ids([huge])
    scheduler.finish([huge])
    assert ids(scheduler.schedule().prefill) == ids([small])


def test_whole_requests_are_handed_out_at_once_outside_the_budget() -> None:
    scheduler = Scheduler(SchedulerConfig(max_active=1, max_kv_tokens=10))
    running, beam, waiting = seq(5, 5), seq(100, 100, whole=True), seq(5, 5)
    for s in (running, beam, waiting):
        scheduler.add(s)
    out = scheduler.schedule()
    assert ids(out.prefill) == ids([running]) and ids(out.whole) == ids([beam])
    assert ids(scheduler.waiting) == ids([waiting]) and beam.seq_id not in scheduler.running


def test_the_static_policy_admits_only_into_an_empty_batch() -> None:
    scheduler = Scheduler(SchedulerConfig(policy="static"))
    first, second = seq(), seq()
    scheduler.add(first)
    scheduler.schedule()
    scheduler.add(second)
    assert scheduler.schedule().prefill == []
    scheduler.finish([first])
    assert ids(scheduler.schedule().prefill) == ids([second])


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="policy must be one of inflight, static"):
        SchedulerConfig(policy="fifo")


def test_a_sequence_says_why_it_stopped() -> None:
    eos = {2}
    ended = seq(max_tokens=5)
    assert not ended.append(7, eos) and ended.append(2, eos)
    assert (ended.generated, ended.finish_reason) == ([7], "stop")
    cut = seq(max_tokens=2)
    assert not cut.append(7, eos) and cut.append(8, eos)
    assert (cut.generated, cut.finish_reason) == ([7, 8], "length")
