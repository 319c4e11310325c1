"""Locust load test for the BLIP-2 Triton ensemble: gRPC and HTTP users, step or fixed load, run data for the report.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000
        --step-users 4 --step-duration 60 --max-steps 5 --run-data loadtest/reports/run.json

`Blip2RetrievalUser` (gRPC) loads the retrieval entry points of a server started with `--itm`; it runs only when
named on the command line.

See docs/LOADTEST.md for every option and for turning the run data into a capacity report.
"""

from __future__ import annotations

import base64
import faulthandler
import itertools
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# Locust puts only this file's directory on sys.path; the helpers are imported as the `loadtest` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent
import gevent.monkey
import grpc.experimental.gevent as grpc_gevent
import locust
import numpy as np
from locust import FastHttpUser, LoadTestShape, User, constant, events, task
from locust.runners import WorkerRunner

# grpcio's C core blocks the whole process under gevent unless it is switched to gevent's poller, and that has
# to happen before the first channel exists.
grpc_gevent.init_gevent()

import tritonclient.grpc as grpcclient  # noqa: E402

from loadtest import images as image_set  # noqa: E402
from loadtest.kserve import HEADER_LENGTH, decode_infer_response, encode_infer_request  # noqa: E402
from loadtest.recorder import RunRecorder  # noqa: E402
from loadtest.shapes import Stage, fixed_plan, phase_at, step_plan  # noqa: E402
from loadtest.workload import DEFAULT_PROMPTS, Workload, load_prompts  # noqa: E402

OUTPUT = "text_output"
EXIT_GRACE_S = 15.0
# After a failed request a user pauses briefly: against a dead or restarting server, zero think time would turn
# every user into a busy loop of connection errors that starves the load machine and floods the report.
FAILURE_BACKOFF_S = 0.1
DEFAULT_RUN_DIR = Path(__file__).resolve().parent / "reports"

recorder = RunRecorder()
_environment: Any = None
_workload: Workload | None = None
_user_ids = itertools.count()


# (option, type, default, help); each is also settable as LOCUST_<OPTION> in the environment or a Locust config file.
OPTIONS: list[tuple[str, type, Any, str]] = [
    ("grpc-url", str, "", "host:port of Triton's gRPC endpoint (default: --host's hostname, port 8001)"),
    ("metrics-url", str, "", "Triton metrics URL (default: http://<--host hostname>:8002/metrics); 'none' disables"),
    ("model-name", str, "blip2", "model the users infer against"),
    ("stage-models", str, "blip2_vision,blip2_llm", "comma-separated stage models to report"),
    ("vqa-ratio", float, 0.5, "fraction of requests that carry a prompt (0 = captions only, 1 = VQA only)"),
    (
        "repeat-ratio",
        float,
        0.0,
        "fraction of requests that resend an image byte-for-byte (server cache hits); "
        "the rest get unique bytes with the same pixels",
    ),
    ("max-tokens", int, 0, "max_tokens sent with each request (0 = omit it, the server default applies)"),
    ("image-dir", str, "", "directory of image files (default: generated set of varied sizes and formats)"),
    ("prompts-file", str, str(DEFAULT_PROMPTS), "VQA prompts, one per line"),
    ("request-timeout", float, 120.0, "per-request timeout in seconds"),
    ("load-mode", str, "step", "step: users rise step by step to find the knee; fixed: constant users (soak)"),
    ("step-users", int, 4, "users added per step"),
    ("step-duration", float, 60.0, "seconds each step is held"),
    ("max-steps", int, 5, "number of steps"),
    ("fixed-users", int, 16, "users in fixed mode"),
    ("fixed-duration", float, 600.0, "seconds of fixed-mode load"),
    ("fixed-interval", float, 60.0, "fixed mode: seconds per report row"),
    ("warmup", float, 10.0, "seconds at the start of each step excluded from the figures"),
    ("ramp-rate", float, 50.0, "users started per second when a step begins"),
    (
        "run-data",
        str,
        "",
        "where to write per-request samples and metric scrapes (default: loadtest/reports/run-<timestamp>.json)",
    ),
    ("seed", int, 0, "seed for the image/prompt choice of each user"),
    ("openai-model", str, "blip2", "Blip2OpenAIUser: the model id sent to /v1/chat/completions"),
    ("openai-api-key", str, "", "Blip2OpenAIUser: sent as 'Authorization: Bearer KEY' when set"),
    (
        "retrieval-entries",
        str,
        "embed_image",
        "Blip2RetrievalUser: comma-separated entry points picked at random per request, of "
        "embed_image, embed_text, similarity, match (texts from --prompts-file)",
    ),
]

# Retrieval entry point -> (model, whether it takes the image, whether it takes text, output).
RETRIEVAL_ENTRIES = {
    "embed_image": ("blip2_embed_image", True, False, "image_embeds"),
    "embed_text": ("blip2_embed_text", False, True, "text_embeds"),
    "similarity": ("blip2_similarity", True, True, "similarity"),
    "match": ("blip2_match", True, True, "match_probability"),
}


def retrieval_entries(opts: Any) -> list[str]:
    entries = [e.strip() for e in opts.retrieval_entries.split(",") if e.strip()]
    unknown = sorted(set(entries) - set(RETRIEVAL_ENTRIES))
    if unknown or not entries:
        raise ValueError(f"--retrieval-entries: expected some of {', '.join(RETRIEVAL_ENTRIES)}, "
                         f"got {unknown or 'none'}")
    return entries


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("BLIP-2 load test")
    for name, kind, default, help_text in OPTIONS:
        extra = {"choices": ["step", "fixed"]} if name == "load-mode" else {}
        env_var = "LOCUST_" + name.upper().replace("-", "_")
        group.add_argument(f"--{name}", type=kind, default=default, env_var=env_var, help=help_text, **extra)


def _options() -> Any:
    return _environment.parsed_options


def _default_url(host: str | None, port: int, path: str = "") -> str:
    hostname = urlparse(host).hostname if host and "://" in host else None
    return f"{hostname or '127.0.0.1'}:{port}{path}"


def grpc_url(opts: Any) -> str:
    return opts.grpc_url or _default_url(opts.host, 8001)


def metrics_url(opts: Any) -> str | None:
    if opts.metrics_url.lower() == "none":
        return None
    return opts.metrics_url or "http://" + _default_url(opts.host, 8002, "/metrics")


def build_stages(opts: Any) -> list[Stage]:
    if opts.load_mode == "fixed":
        return fixed_plan(opts.fixed_users, opts.fixed_duration, opts.fixed_interval, opts.warmup)
    return step_plan(opts.step_users, opts.step_duration, opts.max_steps, opts.warmup)


def workload() -> Workload:
    global _workload
    if _workload is None:
        opts = _options()
        _workload = Workload(
            images=image_set.load_images(Path(opts.image_dir) if opts.image_dir else None),
            prompts=load_prompts(opts.prompts_file),
            vqa_ratio=opts.vqa_ratio,
            repeat_ratio=opts.repeat_ratio,
            max_tokens=opts.max_tokens or None,
            model=opts.model_name,
            stage_models=[m.strip() for m in opts.stage_models.split(",") if m.strip()],
            grpc_url=grpc_url(opts),
            metrics_url=metrics_url(opts),
            request_timeout=opts.request_timeout,
        )
    return _workload


def _user_rng() -> random.Random:
    # Distinct but reproducible choice sequences per user; --seed changes them all.
    return random.Random(_options().seed * 1_000_003 + next(_user_ids))


class _GrpcUser(User):
    abstract = True
    wait_time = constant(0)  # closed loop: users == outstanding requests, i.e. perf_analyzer's concurrency

    def on_start(self) -> None:
        self.work = workload()
        self.rng = _user_rng()
        self.client = grpcclient.InferenceServerClient(url=self.work.grpc_url)

    def on_stop(self) -> None:
        self.client.close()

    def _infer(self, name: str, model: str, inputs: list[grpcclient.InferInput], output: str) -> None:
        """One timed request, reported to Locust under `name`; a response without one row of `output` fails."""
        exception: Exception | None = None
        length = 0
        start = time.perf_counter()
        try:
            result = self.client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(output)],
                                       client_timeout=self.work.request_timeout)
            values = result.as_numpy(output)
            if values is None or values.shape[0] != 1:
                raise ValueError(f"expected one row of {output}, got {None if values is None else values.shape}")
            length = len(values.reshape(-1)[0]) if values.dtype == np.object_ else values.nbytes
        except Exception as exc:
            # Locust prints repr(); InferenceServerException's is empty, so carry its message in a plain exception.
            exception = GrpcInferError(str(exc))
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )
        if exception is not None:
            gevent.sleep(FAILURE_BACKOFF_S)


class Blip2GrpcUser(_GrpcUser):
    @task
    def infer(self) -> None:
        name, image, prompt = self.work.pick(self.rng)
        inputs = [_grpc_bytes_input("image", image)]
        if prompt:
            inputs.append(_grpc_bytes_input("text_input", prompt.encode("utf-8")))
        if self.work.max_tokens is not None:
            tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
            tokens.set_data_from_numpy(np.array([[self.work.max_tokens]], dtype=np.int32))
            inputs.append(tokens)
        self._infer(name, self.work.model, inputs, OUTPUT)


class Blip2RetrievalUser(_GrpcUser):
    """Requests to the retrieval entry points (`--retrieval-entries`), reported by entry point name. Images follow
    `--repeat-ratio` (unique bytes by default: every image a cache miss)."""

    # Only when named (`locust -f loadtest/locustfile.py ... Blip2RetrievalUser`): a run without class names keeps
    # loading captioning, which every server serves.
    weight = 1 if "Blip2RetrievalUser" in sys.argv else 0

    def on_start(self) -> None:
        super().on_start()
        self.entries = retrieval_entries(_options())

    @task
    def infer(self) -> None:
        entry = self.rng.choice(self.entries)
        model, takes_image, takes_text, output = RETRIEVAL_ENTRIES[entry]
        _, image, _ = self.work.pick(self.rng)
        inputs = [_grpc_bytes_input("image", image)] if takes_image else []
        if takes_text:
            inputs.append(_grpc_bytes_input("text_input", self.rng.choice(self.work.prompts).encode("utf-8")))
        self._infer(entry, model, inputs, output)


class GrpcInferError(Exception):
    pass


def _grpc_bytes_input(name: str, value: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_))
    return tensor


def _failed_status(response: Any) -> bool:
    """Marks a non-200 answer failed (with the start of its body) and says so."""
    if response.status_code == 200:
        return False
    detail = (response.text or "")[:200] if response.content else str(getattr(response, "error", ""))
    response.failure(f"HTTP {response.status_code}: {detail}")
    return True


class Blip2HttpUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.work = workload()
        self.rng = _user_rng()
        self.path = f"/v2/models/{self.work.model}/infer"

    @task
    def infer(self) -> None:
        name, image, prompt = self.work.pick(self.rng)
        body, headers = encode_infer_request(image, prompt, self.work.max_tokens, OUTPUT)
        with self.client.post(self.path, data=body, headers=headers, name=name, catch_response=True) as response:
            failed = _failed_status(response) or not self._check(response)
        if failed:
            gevent.sleep(FAILURE_BACKOFF_S)

    def _check(self, response: Any) -> bool:
        try:
            header_length = response.headers.get(HEADER_LENGTH) if response.headers else None
            texts = decode_infer_response(
                response.content or b"", int(header_length) if header_length else None, OUTPUT
            )
            if len(texts) != 1:
                raise ValueError(f"expected one {OUTPUT}, got {len(texts)}")
        except Exception as exc:
            response.failure(f"bad response: {exc}")
            return False
        return True


# The prompts file holds BLIP-2 prompts; the gateway builds that form itself from the question alone.
_VQA_FORM = re.compile(r"^\s*Question:\s*(.*?)\s*Answer:\s*$", re.S)
_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpeg"), (b"GIF8", "gif"), (b"BM", "bmp"), (b"II*\x00", "tiff"),
          (b"MM\x00*", "tiff"))


def question_of(prompt: str | None) -> str | None:
    if not prompt:
        return None
    match = _VQA_FORM.match(prompt)
    return match.group(1) if match else prompt


def image_data_url(image: bytes) -> str:
    kind = "webp" if image[8:12] == b"WEBP" else next((k for magic, k in _MAGIC if image.startswith(magic)), "png")
    return f"data:image/{kind};base64,{base64.b64encode(image).decode()}"


class Blip2OpenAIUser(FastHttpUser):
    """OpenAI chat completions through the front's gateway (POST /v1/chat/completions, the image as a data: URL);
    --host is the front's HTTP URL. Requests are named openai-caption / openai-vqa in the report."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.work = workload()
        self.rng = _user_rng()
        opts = _options()
        self.model = opts.openai_model
        self.headers = {"content-type": "application/json"}
        if opts.openai_api_key:
            self.headers["authorization"] = f"Bearer {opts.openai_api_key}"

    @task
    def chat(self) -> None:
        name, image, prompt = self.work.pick(self.rng)
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_data_url(image)}}]
        question = question_of(prompt)
        if question:
            content.insert(0, {"type": "text", "text": question})
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": content}]}
        if self.work.max_tokens is not None:
            body["max_tokens"] = self.work.max_tokens
        with self.client.post("/v1/chat/completions", data=json.dumps(body), headers=self.headers,
                              name=f"openai-{name}", catch_response=True) as response:
            failed = _failed_status(response)
            if not failed:
                try:
                    text = json.loads(response.content or b"{}")["choices"][0]["message"]["content"]
                    if not isinstance(text, str):
                        raise TypeError(f"expected a string, got {type(text).__name__}")
                except Exception as exc:
                    response.failure(f"bad response: {exc}")
                    failed = True
        if failed:
            gevent.sleep(FAILURE_BACKOFF_S)


class Blip2LoadShape(LoadTestShape):
    def __init__(self) -> None:
        super().__init__()
        self.stages: list[Stage] = []

    def reset_time(self) -> None:
        global _workload
        super().reset_time()
        opts = _options()
        # The web UI can change options between runs; rebuild so each run uses what it was started with.
        _workload = None
        self.stages = build_stages(opts)
        # The master/local runner owns the schedule, so this is where a run starts from the report's point of view.
        recorder.metrics_url = metrics_url(opts)
        recorder.reset(_run_config(opts, self.stages))

    def tick(self) -> tuple[int, float] | None:
        if not self.stages:
            self.reset_time()
        phase = phase_at(self.stages, self.get_run_time())
        recorder.advance(phase, self.runner.user_count if self.runner else None)
        if phase is None:
            return None
        return phase.stage.users, _options().ramp_rate


def _run_config(opts: Any, stages: list[Stage]) -> dict[str, Any]:
    work = workload()
    return {
        "host": opts.host,
        "grpc_url": work.grpc_url,
        "metrics_url": work.metrics_url,
        "model": work.model,
        "stage_models": work.stage_models,
        "load_mode": opts.load_mode,
        "stages": [
            {"index": s.index, "users": s.users, "start_s": s.start, "duration_s": s.duration, "warmup_s": s.warmup}
            for s in stages
        ],
        "user_classes": [cls.__name__ for cls in _environment.user_classes],
        "vqa_ratio": work.vqa_ratio,
        "repeat_ratio": work.repeat_ratio,
        "max_tokens": work.max_tokens,
        "image_dir": str(Path(opts.image_dir).resolve()) if opts.image_dir else str(image_set.default_cache_dir()),
        "images": [name for name, _ in work.images],
        "image_bytes_mean": sum(len(data) for _, data in work.images) / len(work.images),
        "prompts_file": str(Path(opts.prompts_file).resolve()),
        "prompt_count": len(work.prompts),
        "request_timeout_s": work.request_timeout,
        "seed": opts.seed,
        "locust_version": locust.__version__,
        # A busy load machine inflates latency; this makes that visible when reading a report later.
        "client_load_avg_at_start": [round(v, 2) for v in os.getloadavg()],
        "client_cpu_count": os.cpu_count(),
        "command": sys.argv,
    }


def _run_data_path() -> Path:
    opts = _options()
    if not getattr(opts, "_run_data_resolved", None):
        opts._run_data_resolved = opts.run_data or str(DEFAULT_RUN_DIR / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json")
    return Path(opts._run_data_resolved)


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    global _environment
    _environment = environment
    if environment.parsed_options is None:
        return
    opts = environment.parsed_options
    # Fail at start-up, not mid-run, on a bad image dir, prompt file, schedule or entry list.
    build_stages(opts)
    workload()
    retrieval_entries(opts)
    for user_class in (Blip2HttpUser, Blip2OpenAIUser):
        user_class.network_timeout = opts.request_timeout
        user_class.connection_timeout = min(opts.request_timeout, 30.0)


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    global _workload
    if isinstance(environment.runner, WorkerRunner):
        # Workers receive the master's options with each run; the master reloads in Blip2LoadShape.reset_time.
        _workload = None
        workload()


@events.request.add_listener
def _on_request(
    request_type: str, name: str, response_time: float, response_length: int, exception: Any = None, **_: Any
) -> None:
    recorder.add(request_type, name, response_time, response_length, exception)


@events.report_to_master.add_listener
def _on_report_to_master(client_id: str, data: dict[str, Any], **_: Any) -> None:
    data["blip2_run"] = recorder.drain()


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    if "blip2_run" in data:
        recorder.merge(data["blip2_run"])


def _dump(environment: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or not recorder.config:
        return
    path = recorder.dump(_run_data_path())
    print(f"run data written to {path}", file=sys.stderr)


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    recorder.close()
    _dump(environment)


@events.quitting.add_listener
def _on_quitting(environment: Any, **_: Any) -> None:
    # Workers' last reports can land after test_stop; write again so they are included.
    _dump(environment)


@events.quit.add_listener
def _exit_watchdog(exit_code: int, **_: Any) -> None:
    # grpcio under gevent can, rarely, wedge interpreter shutdown after everything has been written, leaving a CI
    # job waiting on a finished run. A native (unpatched) thread forces the exit with Locust's own exit code if
    # shutdown overruns; faulthandler is the last resort (exit code 1) and shows where it was stuck.
    start_thread = gevent.monkey.get_original("_thread", "start_new_thread")
    sleep = gevent.monkey.get_original("time", "sleep")

    def watchdog() -> None:
        sleep(EXIT_GRACE_S)
        os.write(2, f"locust did not exit within {EXIT_GRACE_S:.0f} s of finishing; forcing exit\n".encode())
        os._exit(exit_code)

    start_thread(watchdog, ())
    faulthandler.dump_traceback_later(EXIT_GRACE_S + 10, exit=True)
