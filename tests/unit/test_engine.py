"""The in-flight engine in-process: joins mid-flight, streaming, cancellation, limits."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from images import PROMPTS

from blip2_triton.errors import InvalidRequestError
from blip2_triton.llm import (
    AbandonedError,
    CancelledError,
    Completion,
    EngineLimits,
    EngineObserver,
    InflightEngine,
    Job,
    LanguageStage,
)
from blip2_triton.llm.batch import BatchState
from blip2_triton.options import ServerOptions
from blip2_triton.requests import GenerationRequest, ImageRequest
from blip2_triton.vision import VisionStage


class Collector:
    def __init__(self, count: int) -> None:
        self.results: dict[int, str | Exception] = {}
        self.completions: dict[int, Completion | Exception] = {}
        self.pieces: dict[int, list[str]] = {i: [] for i in range(count)}
        self.count = count
        self.all_done = threading.Event()

    def job(self, i: int, request: GenerationRequest, *, stream: bool = True, **kwargs) -> Job:
        def done(result: Completion | Exception) -> None:
            assert i not in self.results, "on_done must be called exactly once"
            self.results[i] = result.text if isinstance(result, Completion) else result
            self.completions[i] = result
            if len(self.results) == self.count:
                self.all_done.set()

        return Job(request=request, on_piece=self.pieces[i].append if stream else None, on_done=done, **kwargs)


@pytest.fixture(scope="module", params=["opt", "t5"])
def setup(request, tiny_model_dir: Path, tiny_t5_model_dir: Path, hf_reference, t5_reference, sample_images):
    model_dir, reference = (tiny_model_dir, hf_reference) if request.param == "opt" else (
        tiny_t5_model_dir, t5_reference)
    options = ServerOptions(model_id=str(model_dir))
    vision, language = VisionStage(options), LanguageStage(options)
    names = sorted(sample_images)
    embeds = dict(zip(names, vision.run([ImageRequest(sample_images[n]) for n in names]), strict=True))
    return language, embeds, reference


def test_jobs_joining_mid_flight_match_the_reference(setup, sample_images) -> None:
    language, embeds, reference = setup
    cases = [(name, PROMPTS[i % 2], 3 + (i * 7) % 30) for i, name in enumerate(sorted(embeds) * 2)]
    collector = Collector(len(cases))
    engine = InflightEngine(language, limits=EngineLimits(max_active=5))
    try:
        for i, (name, prompt, n) in enumerate(cases):
            engine.submit([collector.job(i, GenerationRequest(query_embeds=embeds[name], prompt=prompt, max_tokens=n),
                                         stream=i % 3 != 0)])
            time.sleep(0.002)  # trickle in, so jobs join a batch that is already decoding
        assert collector.all_done.wait(120)
    finally:
        engine.stop()
    for i, (name, prompt, n) in enumerate(cases):
        assert collector.results[i] == reference(sample_images[name], prompt, n)
        if i % 3 != 0:
            assert "".join(collector.pieces[i]) == collector.results[i]
        else:
            assert collector.pieces[i] == []


def test_newcomers_share_the_running_steps_output_projection(setup, sample_images) -> None:
    # An iteration that both steps the running batch and prefills newcomers projects all their rows onto the
    # vocabulary in one pass (one pass over the largest weight instead of two), with the same texts.
    language, embeds, reference = setup
    if not language.runner.shares_output_projection:
        pytest.skip("only OPT's forward is split into decoder and output projection")
    head = language.lm.get_output_embeddings()
    projections: list[int] = []
    handle = head.register_forward_hook(lambda _m, args, _out: projections.append(args[0].shape[0]))
    steps: list[int] = []
    names = sorted(embeds)
    cases = [(names[i % len(names)], PROMPTS[i % 2], 40 if i == 0 else 6) for i in range(6)]
    collector = Collector(len(cases))
    jobs = [collector.job(i, GenerationRequest(query_embeds=embeds[name], prompt=prompt, max_tokens=n))
            for i, (name, prompt, n) in enumerate(cases)]

    class Recorder(EngineObserver):
        def on_step(self, active: int, new_tokens: int) -> None:
            if not steps:
                # On the engine thread, right after the first job's prefill: the others are collected at the
                # next iteration, whatever the machine's speed, and join the first job's running batch.
                engine.submit(jobs[1:])
            steps.append(active)

    engine = InflightEngine(language, observer=Recorder())
    try:
        engine.submit(jobs[:1])
        assert collector.all_done.wait(120)
    finally:
        engine.stop()
        handle.remove()
    for i, (name, prompt, n) in enumerate(cases):
        assert collector.results[i] == reference(sample_images[name], prompt, n)
    shared = len(steps) - len(projections)
    assert shared > 0, "no iteration projected a step and a prefill together"
    assert sum(projections) == sum(steps), "every row is projected exactly once"


def test_invalid_job_fails_alone(setup) -> None:
    language, embeds, _ = setup
    emb = next(iter(embeds.values()))
    collector = Collector(2)
    engine = InflightEngine(language)
    try:
        engine.submit([collector.job(0, GenerationRequest(query_embeds=emb, max_tokens=0)),
                       collector.job(1, GenerationRequest(query_embeds=emb, max_tokens=3))])
        assert collector.all_done.wait(60)
    finally:
        engine.stop()
    assert isinstance(collector.results[0], InvalidRequestError)
    assert isinstance(collector.results[1], str)


def test_cancellation_stops_a_job_and_frees_its_slot(setup) -> None:
    language, embeds, _ = setup
    if not language.decoder_only:
        pytest.skip("encoder-decoder requests are generated whole, between steps")
    emb = next(iter(embeds.values()))
    cancel = threading.Event()
    collector = Collector(3)
    engine = InflightEngine(language, limits=EngineLimits(max_active=1, cancel_check_interval_s=0.0))
    try:
        engine.submit([collector.job(0, GenerationRequest(query_embeds=emb, max_tokens=256),
                                     is_cancelled=cancel.is_set)])
        engine.submit([collector.job(1, GenerationRequest(query_embeds=emb, max_tokens=256), job_id="j1")])
        engine.submit([collector.job(2, GenerationRequest(query_embeds=emb, max_tokens=4))])
        cancel.set()
        engine.cancel("j1")
        assert collector.all_done.wait(60)
    finally:
        engine.stop()
    assert isinstance(collector.results[0], CancelledError)
    assert isinstance(collector.results[1], CancelledError)
    # max_active=1: job 2 could only run once the cancelled ones left.
    assert isinstance(collector.results[2], str) and collector.results[2]
    assert len(engine.batch) == 0


def test_stopped_engine_takes_no_work(setup) -> None:
    language, embeds, _ = setup
    emb = next(iter(embeds.values()))
    collector = Collector(1)
    engine = InflightEngine(language)
    engine.stop()
    engine.submit([collector.job(0, GenerationRequest(query_embeds=emb, max_tokens=3))])
    assert not collector.all_done.wait(0.5), "a stopped engine takes no more work"


class _FailsOnFirstDeparture(BatchState):
    """Fails the step in which rows first leave the batch: after they completed, before they were removed."""

    failed = False

    def retain(self, keep: list[int]) -> None:
        if not self.failed and len(keep) < len(self):
            self.failed = True
            raise RuntimeError("injected failure")
        super().retain(keep)


def test_a_failed_step_answers_every_job_exactly_once(setup, sample_images) -> None:
    language, embeds, reference = setup
    if not language.decoder_only:
        pytest.skip("encoder-decoder requests are generated whole, between steps")
    name = sorted(embeds)[0]
    calls: dict[int, list[str | Exception]] = {i: [] for i in range(5)}
    everyone = threading.Event()

    def job(i: int, max_tokens: int) -> Job:
        def done(result: Completion | Exception) -> None:
            calls[i].append(result.text if isinstance(result, Completion) else result)
            if all(calls.values()):
                everyone.set()

        return Job(request=GenerationRequest(query_embeds=embeds[name], max_tokens=max_tokens), on_piece=None,
                   on_done=done)

    engine = InflightEngine(language)
    engine.batch = _FailsOnFirstDeparture()
    try:
        # Jobs 0 and 1 complete on the first decoding step, whose removal of them then fails.
        engine.submit([job(0, 2), job(1, 2), job(2, 6), job(3, 6)])
        time.sleep(0.5)
        engine.submit([job(4, 3)])  # the engine goes on serving after the failure
        assert everyone.wait(60)
        time.sleep(0.2)  # a second answer would arrive right after the first
    finally:
        engine.stop()
    assert [len(c) for c in calls.values()] == [1] * 5
    assert calls[0] == calls[1] == [reference(sample_images[name], None, 2)]
    assert all(isinstance(calls[i][0], RuntimeError) for i in (2, 3))
    assert calls[4] == [reference(sample_images[name], None, 3)]


def test_kv_cache_bytes_are_reported_while_decoding_and_freed_after(setup) -> None:
    language, embeds, _ = setup
    if not language.decoder_only:
        pytest.skip("encoder-decoder requests are generated whole, between steps")
    reported: list[int] = []

    class Recorder(EngineObserver):
        def on_kv_cache(self, nbytes: int) -> None:
            reported.append(nbytes)

    emb = next(iter(embeds.values()))
    collector = Collector(3)
    engine = InflightEngine(language, observer=Recorder())
    try:
        engine.submit([collector.job(i, GenerationRequest(query_embeds=emb, max_tokens=4 + 4 * i)) for i in range(3)])
        assert collector.all_done.wait(60)
        time.sleep(0.3)  # the report after the last sequence left comes with the next iteration
    finally:
        engine.stop()
    assert reported and max(reported) > 0
    assert reported[-1] == 0


def test_padding_trim_from_host_lengths_matches_the_mask(setup, sample_images) -> None:
    # The engine drops all-padding columns using lengths it knows on the host (no device read). Under prompts
    # of different lengths, joins, retirements and a cancellation, that must cut exactly where the mask says.
    language, embeds, reference = setup
    if not language.decoder_only:
        pytest.skip("encoder-decoder requests are generated whole, between steps")
    cuts: list[int] = []
    failures: list[str] = []  # asserted here: the engine thread would turn an AssertionError into failed jobs

    class Checked(BatchState):
        def trim(self) -> None:
            if self.mask is None or not self.seqs:
                super().trim()
                return
            used = self.mask.any(dim=0).nonzero()
            expected = int(used[0]) if used.numel() else 0
            before = self.mask.shape[1]
            super().trim()
            if before - self.mask.shape[1] != expected:
                failures.append(f"cut {before - self.mask.shape[1]} columns, the mask says {expected}")
            if self.kv is None or self.mask.shape[1] != self.kv.width:
                failures.append(f"mask width {self.mask.shape[1]} != cache width")
            cuts.append(expected)

    names = sorted(embeds)
    prompts = [None, PROMPTS[0], PROMPTS[1] + " and what else is there to see here?"]
    cases = [(names[i % len(names)], prompts[i % 3], 2 + (i * 5) % 17) for i in range(12)]
    collector = Collector(len(cases))
    engine = InflightEngine(language, limits=EngineLimits(max_active=4, cancel_check_interval_s=0.0))
    engine.batch = Checked(max_rows=4)
    try:
        for i, (name, prompt, n) in enumerate(cases):
            job = collector.job(i, GenerationRequest(query_embeds=embeds[name], prompt=prompt, max_tokens=n),
                                stream=False)
            if i == 5:  # leaves the running batch mid-generation, after its third token
                job.is_cancelled = lambda job=job: job.seq is not None and len(job.seq.generated) >= 3
            engine.submit([job])
            time.sleep(0.002)
        assert collector.all_done.wait(120)
    finally:
        engine.stop()
    assert failures == []
    assert any(cuts), "no iteration had padding to trim: the case does not exercise the trim"
    assert isinstance(collector.results[5], CancelledError)
    for i, (name, prompt, n) in enumerate(cases):
        if i != 5:
            assert collector.results[i] == reference(sample_images[name], prompt, n)


def test_jobs_whose_admission_fails_are_answered(setup, sample_images, monkeypatch) -> None:
    # The first prefill (or whole generation) fails after its jobs left the waiting list, before they ran.
    language, embeds, reference = setup
    failed: list[str] = []

    def fails_once(method):
        def run(*args, **kwargs):
            if not failed:
                failed.append(method.__name__)
                raise RuntimeError("injected failure")
            return method(*args, **kwargs)
        return run

    for name in ("prefill", "generate"):
        monkeypatch.setattr(language.runner, name, fails_once(getattr(language.runner, name)))
    name = sorted(embeds)[0]
    first, later = Collector(2), Collector(1)
    engine = InflightEngine(language)
    try:
        engine.submit([first.job(i, GenerationRequest(query_embeds=embeds[name], max_tokens=3)) for i in range(2)])
        assert first.all_done.wait(30), "jobs taken into a failed iteration were never answered"
        engine.submit([later.job(0, GenerationRequest(query_embeds=embeds[name], max_tokens=3))])
        assert later.all_done.wait(60)
    finally:
        engine.stop()
    assert all(isinstance(first.results[i], RuntimeError) for i in range(2))
    assert later.results[0] == reference(sample_images[name], None, 3)


def test_sampling_that_overflows_fails_only_its_request(setup, sample_images) -> None:
    language, embeds, reference = setup
    name = sorted(embeds)[0]
    emb = embeds[name]
    first_tokens: list[float] = []

    class Recorder(EngineObserver):
        def on_first_token(self, seconds: float) -> None:
            first_tokens.append(seconds)

    collector = Collector(3)
    engine = InflightEngine(language, observer=Recorder())
    try:
        engine.submit([
            collector.job(0, GenerationRequest(query_embeds=emb, max_tokens=4)),
            # Logits ÷ 1e-45 overflow float32: softmax gives NaN, which torch.multinomial refuses.
            collector.job(1, GenerationRequest(query_embeds=emb, max_tokens=4, temperature=1e-45)),
            collector.job(2, GenerationRequest(query_embeds=emb, max_tokens=4, temperature=0.7, seed=3)),
        ])
        assert collector.all_done.wait(60)
    finally:
        engine.stop()
    assert collector.results[0] == reference(sample_images[name], None, 4)
    assert isinstance(collector.results[1], InvalidRequestError)
    assert "temperature=1e-45" in str(collector.results[1])
    assert isinstance(collector.results[2], str) and collector.results[2]
    if language.decoder_only:  # the engine steps these rows itself: no first token for the failed one
        assert len(first_tokens) == 2


def test_a_row_whose_request_was_answered_stops_without_counting_as_cancelled(setup) -> None:
    language, embeds, _ = setup
    if not language.decoder_only:
        pytest.skip("encoder-decoder requests are generated whole, between steps")
    outcomes: list[str] = []
    answered = threading.Event()

    class Recorder(EngineObserver):
        def on_first_token(self, seconds: float) -> None:
            answered.set()  # mid-generation: a sibling row's failure answers the request now

        def on_finished(self, job: Job, outcome: str) -> None:
            outcomes.append(outcome)

    emb = next(iter(embeds.values()))
    collector = Collector(1)
    engine = InflightEngine(language, observer=Recorder())
    try:
        engine.submit([collector.job(0, GenerationRequest(query_embeds=emb, max_tokens=256), stream=False,
                                     is_abandoned=answered.is_set)])
        assert collector.all_done.wait(60)
    finally:
        engine.stop()
    assert isinstance(collector.results[0], AbandonedError)
    assert outcomes == ["AbandonedError"]


def test_cancels_for_finished_or_unknown_jobs_are_not_kept(setup) -> None:
    language, embeds, _ = setup
    emb = next(iter(embeds.values()))
    collector = Collector(1)
    engine = InflightEngine(language)
    try:
        engine.cancel("never-submitted")
        engine.submit([collector.job(0, GenerationRequest(query_embeds=emb, max_tokens=2), job_id="done-soon")])
        assert collector.all_done.wait(60)
        engine.cancel("done-soon")  # arrives after the job finished
    finally:
        engine.stop()
    assert isinstance(collector.results[0], str)
    assert engine._cancel_flags == {}


def test_completions_count_tokens_and_say_why_they_stopped(setup) -> None:
    language, embeds, _ = setup
    emb = next(iter(embeds.values()))
    collector = Collector(2)
    engine = InflightEngine(language)
    try:
        engine.submit([collector.job(0, GenerationRequest(query_embeds=emb, max_tokens=5)),
                       collector.job(1, GenerationRequest(query_embeds=emb, max_tokens=3, beam_width=2))])
        assert collector.all_done.wait(60)
    finally:
        engine.stop()
    for i, limit in ((0, 5), (1, 3)):
        completion = collector.completions[i]
        assert isinstance(completion, Completion)
        assert completion.text == collector.results[i]
        assert (completion.finish_reason, completion.tokens) in (("length", limit), ("stop", completion.tokens))
        assert completion.tokens <= limit
        if completion.finish_reason == "stop":
            assert completion.tokens < limit


def test_beam_search_does_not_hold_up_greedy_rows(setup) -> None:
    # Beam search runs whole, on its own thread: greedy requests submitted after it keep stepping meanwhile.
    language, embeds, _ = setup
    if not language.decoder_only:
        pytest.skip("encoder-decoder requests are all generated whole")
    emb = next(iter(embeds.values()))
    order: list[str] = []
    done = threading.Event()

    def job(name: str, request: GenerationRequest) -> Job:
        def finished(result: Completion | Exception) -> None:
            assert isinstance(result, Completion), result
            order.append(name)
            if len(order) == 3:
                done.set()

        return Job(request=request, on_piece=None, on_done=finished)

    engine = InflightEngine(language)
    try:
        engine.submit([job(f"beam{i}", GenerationRequest(query_embeds=emb, max_tokens=200, beam_width=8))
                       for i in range(2)])
        time.sleep(0.2)  # the beams are running
        engine.submit([job("greedy", GenerationRequest(query_embeds=emb, max_tokens=4))])
        assert done.wait(300)
    finally:
        engine.stop()
    assert order[0] == "greedy", order


def test_a_final_text_that_rewrites_sent_pieces_is_logged(tiny_model_dir: Path, caplog) -> None:
    # A decode whose clean-up joins across tokens ("a '" then "a'b") cannot be streamed exactly: say so.
    engine = InflightEngine(LanguageStage(ServerOptions(model_id=str(tiny_model_dir))), threaded=False)
    pieces: list[str] = []
    job = Job(request=GenerationRequest(query_embeds=None, max_tokens=2), on_piece=pieces.append,
              on_done=lambda _: None, request_id="r-1")
    engine._emit(job, "a '", final=False)
    with caplog.at_level("WARNING", logger="blip2_triton.llm.engine"):
        engine._emit(job, "a'b", final=True)
    engine._flush()
    assert pieces == ["a '"]
    assert "request r-1: streamed text" in caplog.text and "not a prefix of the final text" in caplog.text
    caplog.clear()
    engine._emit(job, "a 'b", final=True)  # the usual case: the rest goes out, nothing logged
    engine._flush()
    assert pieces == ["a '", "b"] and not caplog.text
