"""The LLM stage's engine: one thread that connects the scheduler, the running batch, the model runner and the
sampler, and delivers each job's text. Whole-request generations (beam search, encoder-decoder LMs) run on a worker
thread beside it, so they never stall the running batch.

Nothing here imports Triton: callers pass plain callables to receive text pieces and the final result.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import InvalidRequestError
from ..requests import GenerationRequest
from .batch import Prefilled
from .detokenizer import StreamText
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Completion, Sequence
from .stage import LanguageStage

log = logging.getLogger(__name__)


class CancelledError(RuntimeError):
    """The client cancelled the request (or its deadline passed) before generation finished."""


class AbandonedError(CancelledError):
    """The job's request was already answered (another of its rows failed): nobody waits for this row."""


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    # Receives each new piece of text when streaming; the pieces concatenate to the final text.
    on_piece: Callable[[str], None] | None
    # Receives the completion, or the exception that ended the job. Called exactly once.
    on_done: Callable[[Completion | Exception], None]
    is_cancelled: Callable[[], bool] = lambda: False
    # A local check, made every iteration: whether the result can no longer reach anyone.
    is_abandoned: Callable[[], bool] = lambda: False
    # For `InflightEngine.cancel` (the stream front end: Triton does not pass its cancellation on to BLS requests).
    job_id: str | None = None
    # The client's request id, for log lines about this job.
    request_id: str = ""
    submitted_at: float = field(default_factory=time.monotonic)
    seq: Sequence | None = None
    # A stream's text so far, decoded a few tokens per step, and the part of it already sent.
    stream: StreamText = field(default_factory=StreamText)
    sent: str = ""
    first_token_at: float | None = None
    cancel_checked_at: float = 0.0
    finished: bool = False


class EngineObserver(Protocol):
    """Hooks for metrics (`serving.metrics.EngineMetrics`); a subclass overrides those it needs, the rest do nothing."""

    def on_step(self, active: int, new_tokens: int) -> None: ...

    def on_first_token(self, seconds: float) -> None: ...

    def on_finished(self, job: Job, outcome: str) -> None: ...

    def on_active(self, active: int, waiting: int) -> None: ...

    def on_admitted(self, waited_s: float) -> None: ...

    def on_kv_cache(self, nbytes: int) -> None: ...

    def on_graphs(self, nbytes: int) -> None: ...


@dataclass(frozen=True)
class EngineLimits(SchedulerConfig):
    # How often each job asks Triton whether its request was cancelled (an IPC round trip).
    cancel_check_interval_s: float = 0.05


# What the engine thread's queue carries: new jobs, whole generations that ended, or None (stop).
_Item = list[Job] | tuple[list[Sequence], Exception | None] | None


class InflightEngine:
    def __init__(self, stage: LanguageStage, *, limits: EngineLimits | None = None,
                 observer: EngineObserver | None = None, on_iteration: Callable[[], None] | None = None,
                 idle_tick_s: float = 0.25, threaded: bool = True) -> None:
        self.stage = stage
        self.limits = limits or EngineLimits()
        self.observer = observer
        # Called on the engine thread after every iteration and every `idle_tick_s` while idle (expires stream polls).
        self.on_iteration = on_iteration
        self.idle_tick_s = idle_tick_s
        self.scheduler = Scheduler(self.limits)
        self.batch = stage.runner.new_batch(max_rows=self.limits.max_active)
        self._jobs: dict[int, Job] = {}  # seq_id -> job of every sequence the scheduler or the worker holds
        self._queue: queue.Queue[_Item] = queue.Queue()
        # Id of every submitted, unfinished job -> whether it was cancelled; cancels for other ids are dropped.
        self._cancel_flags: dict[str, bool] = {}
        self._cancel_lock = threading.Lock()
        # Results, pieces and metrics are IPC round trips to Triton: made between iterations, outside compute.
        self._deferred: list[Callable[[], None]] = []
        self._reported: dict[str, tuple[int, ...]] = {}
        self._whole: queue.Queue[list[Sequence] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        if threaded:
            self._threads = [threading.Thread(target=self._run, name="blip2-llm-engine", daemon=True),
                             threading.Thread(target=self._run_whole, name="blip2-llm-whole", daemon=True)]
            for thread in self._threads:
                thread.start()

    # ---- public API (any thread) ---------------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        with self._cancel_lock:
            for job in jobs:
                if job.job_id is not None:
                    # A cancel still pending for a live job of the same id must not be undone.
                    self._cancel_flags.setdefault(job.job_id, False)
        self._queue.put(list(jobs))

    def capture_graphs(self) -> int:
        """Captures the runner's CUDA graphs for this engine's batch before any work is submitted; how many."""
        started = time.monotonic()
        count = self.stage.runner.capture_graphs(self.batch, self.limits.max_active)
        if count:
            log.info("captured %d decoding-step graphs in %.1f s; graphs hold %d bytes", count,
                     time.monotonic() - started, self.batch.graph_bytes)
        return count

    def cancel(self, job_id: str) -> None:
        with self._cancel_lock:
            if job_id in self._cancel_flags:
                self._cancel_flags[job_id] = True

    def stop(self, timeout_s: float = 30.0) -> None:
        self._queue.put(None)
        self._whole.put(None)
        for thread in self._threads:
            thread.join(timeout_s)

    # ---- engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._collect(block=not self.scheduler.has_work()):
                self._guarded(self._drop_stopped)
                self._flush()
                if self.scheduler.has_work():
                    with self.stage.runner.compute, torch.inference_mode():
                        self._guarded(self._iteration)
                self._report("on_active", len(self.scheduler.running), len(self.scheduler.waiting))
                self._report("on_kv_cache", self.batch.nbytes)
                self._report("on_graphs", self.batch.graph_bytes)
                self._flush()
                if self.on_iteration is not None:
                    try:
                        self.on_iteration()
                    except Exception:
                        log.exception("engine iteration hook failed")
        finally:
            self._flush()

    def _collect(self, *, block: bool) -> bool:
        """Takes in new jobs and ended whole generations; False once the engine is told to stop."""
        try:
            while True:
                item = self._queue.get(block=block, timeout=self.idle_tick_s if block else None)
                block = False
                if item is None:
                    self._fail_all(CancelledError("server is shutting down"), whole=True)
                    return False
                if isinstance(item, tuple):
                    self._whole_done(*item)
                    continue
                for job in item:
                    self._admit(job)
        except queue.Empty:
            return True

    def _admit(self, job: Job) -> None:
        try:
            job.seq = self.stage.prepare(job.request)
        except InvalidRequestError as e:
            self._finish(job, e)
            return
        self._jobs[job.seq.seq_id] = job
        self.scheduler.add(job.seq)

    def _guarded(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as e:  # a bug or OOM fails the affected requests, never the thread
            log.exception("LLM engine iteration failed; failing its %d requests", len(self.scheduler.running))
            self._fail_all(e)

    def _iteration(self) -> None:
        out = self.scheduler.schedule()
        if out.whole:
            self._start_whole(out.whole)
        now = time.monotonic()
        for seq in out.prefill:
            self._notify("on_admitted", now - self._jobs[seq.seq_id].submitted_at)
        runner = self.stage.runner
        if out.decode:
            self.batch.begin_step()
        if out.decode and out.prefill and runner.shares_output_projection:
            logits, prefilled = runner.decode_and_prefill(self.batch, out.prefill)
            self._stepped(logits)
            self._prefilled(out.prefill, prefilled)
        else:
            if out.decode:
                self._stepped(runner.decode(self.batch))
            if out.prefill:
                self._prefilled(out.prefill, runner.prefill(out.prefill))
        self.batch.trim()

    def _stepped(self, logits: torch.Tensor) -> None:
        self._notify("on_step", len(self.batch), len(self.batch))
        keep = self._accept(self.batch.seqs, logits)
        if len(keep) < len(self.batch):
            self.batch.retain(keep)

    def _prefilled(self, seqs: list[Sequence], prefilled: Prefilled) -> None:
        self._notify("on_step", len(seqs), len(seqs))
        keep = self._accept(seqs, prefilled.logits)
        if keep:
            self.batch.merge([seqs[i] for i in keep], prefilled if len(keep) == len(seqs) else prefilled.select(keep))

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Samples one token per sequence and finishes the complete ones; the positions of the others."""
        tokens = self.stage.sampler.sample(seqs, logits)
        now = time.monotonic()
        keep: list[int] = []
        for pos, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            job = self._jobs[seq.seq_id]
            if seq.error is None and job.first_token_at is None:
                job.first_token_at = now
                self._notify("on_first_token", now - job.submitted_at)
            if seq.append(token, self.stage.eos_token_ids):
                self._complete(job)
                continue
            if job.on_piece is not None:  # detokenising costs per step; only streams need text before the end
                self._emit(job, self.stage.detokenizer.advance(job.stream, seq.generated).strip(), final=False)
            keep.append(pos)
        return keep

    def _complete(self, job: Job) -> None:
        assert job.seq is not None
        if job.seq.error is not None:
            self._finish(job, job.seq.error)
            return
        text = self.stage.text(job.seq)
        self._emit(job, text, final=True)
        self._finish(job, Completion(text, len(job.seq.generated), job.seq.finish_reason, len(job.seq.prompt_ids)))

    def _emit(self, job: Job, text: str, *, final: bool) -> None:
        if job.on_piece is None:
            return
        # Trailing whitespace and an incomplete multi-byte character may still change: hold them back until more
        # text follows, so the pieces concatenate to exactly the final (stripped) text.
        stable = text if final else text.rstrip()
        if not final and stable.endswith("\ufffd"):
            return
        if stable.startswith(job.sent) and len(stable) > len(job.sent):
            piece, job.sent, on_piece = stable[len(job.sent):], stable, job.on_piece
            self._deferred.append(lambda: on_piece(piece))
        elif final and not stable.startswith(job.sent):
            # A tokenizer whose decode rewrites earlier text (a clean-up pass joining across tokens): pieces cannot
            # be taken back, so the stream's text differs from the completion's. Say so rather than pass silently.
            log.warning("request %s: streamed text %r is not a prefix of the final text %r; the completion carries "
                        "the final text", job.request_id or "-", job.sent[-40:], stable[-40:],
                        extra={"request_id": job.request_id or None})

    def _drop_stopped(self) -> None:
        now = time.monotonic()
        stopped = [(job, error) for job in list(self._jobs.values()) if (error := self._stop_error(job, now))]
        if not stopped:
            return
        for job, error in stopped:
            self._finish(job, error)
        running = {seq.seq_id for seq in self.scheduler.running.values()}
        keep = [pos for pos, seq in enumerate(self.batch.seqs) if seq.seq_id in running]
        if len(keep) < len(self.batch):
            self.batch.retain(keep)

    def _stop_error(self, job: Job, now: float) -> CancelledError | None:
        assert job.seq is not None
        if job.seq.whole:
            return None  # generated whole on the worker: it cannot stop midway
        if job.is_abandoned():
            return AbandonedError("request already answered")
        # A flag read without the lock is at worst seen one iteration late; `_finish` then drops it.
        if job.job_id is not None and self._cancel_flags.get(job.job_id):
            return CancelledError("request cancelled")
        if now - job.cancel_checked_at < self.limits.cancel_check_interval_s:
            return None
        job.cancel_checked_at = now
        return CancelledError("request cancelled") if job.is_cancelled() else None

    def _finish(self, job: Job, result: Completion | Exception) -> None:
        if job.finished:
            return
        job.finished = True
        if job.seq is not None:
            self._jobs.pop(job.seq.seq_id, None)
            self.scheduler.finish([job.seq])
        if job.job_id is not None:
            with self._cancel_lock:
                self._cancel_flags.pop(job.job_id, None)
        outcome = "ok" if isinstance(result, Completion) else type(result).__name__
        if type(result) is CancelledError and job.seq is not None:
            log.info("request %s: %s after %d tokens", job.request_id or "-", result, len(job.seq.generated),
                     extra={"request_id": job.request_id or None})
        self._deferred.append(lambda: job.on_done(result))
        self._notify("on_finished", job, outcome)

    def _fail_all(self, error: Exception, *, whole: bool = False) -> None:
        # A failed iteration concerns the running batch and the queue; whole generations go on, on their worker.
        for job in list(self._jobs.values()):
            assert job.seq is not None
            if whole or not job.seq.whole:
                self._finish(job, error)
        self.batch.clear()

    def _notify(self, event: str, *args: Any) -> None:
        if self.observer is not None:
            handler = getattr(self.observer, event)
            self._deferred.append(lambda: handler(*args))

    def _report(self, event: str, *values: int) -> None:
        # Gauges go out only when they change: each report is an IPC round trip.
        if self._reported.get(event) != values:
            self._reported[event] = values
            self._notify(event, *values)

    def _flush(self) -> None:
        deferred, self._deferred = self._deferred, []
        for call in deferred:
            try:
                call()
            except Exception:
                log.exception("delivering a result, text piece or metric failed")

    # ---- whole generations -----------------------------------------------------------------------------------
    def _start_whole(self, seqs: list[Sequence]) -> None:
        if self._threads:
            self._whole.put(seqs)
        else:
            self._whole_done(seqs, self._generate_whole(seqs))

    def _run_whole(self) -> None:
        while (seqs := self._whole.get()) is not None:
            # Everything queued meanwhile goes into the same call (greedy rows batch).
            while not self._whole.empty():
                more = self._whole.get()
                if more is None:
                    self._queue.put((seqs, CancelledError("server is shutting down")))
                    return
                seqs = seqs + more
            with self.stage.runner.compute, torch.inference_mode():
                self._queue.put((seqs, self._generate_whole(seqs)))

    def _generate_whole(self, seqs: list[Sequence]) -> Exception | None:
        try:
            self.stage.runner.generate(seqs)
            return None
        except Exception as e:
            if not self._threads:
                raise
            log.exception("whole generation of %d requests failed", len(seqs))
            return e

    def _whole_done(self, seqs: list[Sequence], error: Exception | None) -> None:
        self._notify("on_step", len(seqs), 0)
        for seq in seqs:
            job = self._jobs.get(seq.seq_id)
            if job is None:
                continue
            if error is not None:
                self._finish(job, error)
            else:
                self._complete(job)


def run_static(stage: LanguageStage, requests: list[GenerationRequest]) -> list[tuple[Job, Completion | Exception]]:
    """`requests` as one static batch on the calling thread: each job (its `seq` holds the tokens) and its result;
    an error that is not a request's own is raised."""
    results: list[Completion | Exception] = [Completion("", 0, "stop")] * len(requests)
    engine = InflightEngine(stage, threaded=False, limits=EngineLimits(
        policy="static", max_active=max(1, len(requests)), max_kv_tokens=2**62))
    jobs = [Job(request=r, on_piece=None, on_done=lambda result, i=i: results.__setitem__(i, result))
            for i, r in enumerate(requests)]
    engine.submit(jobs)
    engine._collect(block=False)
    with torch.inference_mode():
        while engine.scheduler.has_work():
            engine._iteration()
    engine._flush()
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, InvalidRequestError):
            raise result
    return list(zip(jobs, results, strict=True))
