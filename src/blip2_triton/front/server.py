"""`Front`: the HTTP and gRPC servers users reach, in front of a Triton listening on loopback. Runs in a
background thread with its own event loop and installs no signal handlers, so a supervisor can embed it."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import grpc
import httpx
import uvicorn
from prometheus_client import start_wsgi_server

from .common import FrontState
from .gateway import CHANNEL_OPTIONS, Gateway
from .grpc_proxy import GrpcProxy, server_options
from .http_app import build_app
from .limits import ByteBudget
from .metrics import FrontMetrics
from .playground import PATH as PLAYGROUND_PATH
from .settings import FrontSettings

log = logging.getLogger("blip2_triton.front")


class FrontStartupError(RuntimeError):
    pass


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FrontStartupError(f"cannot listen on {host}:{port}: {e}") from e
    sock.set_inheritable(True)
    return sock


class Front:
    """`Front(settings, ready=...).start()` serves until `stop()`; also a context manager.

    `ready` is asked by the readiness routes (HTTP `/v2/health/ready`, gRPC `ServerReady`) besides Triton: a
    supervisor passes its watchdog's verdict on the stage processes. Ports given as 0 are picked by the OS and
    readable as `http_port`, `grpc_port` and `metrics_port` once started."""

    def __init__(self, settings: FrontSettings | None = None, *, ready: Callable[[], bool] | None = None) -> None:
        self.settings = (settings or FrontSettings()).validate()
        self.ready = ready or (lambda: True)
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self.openai_port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def playground_url(self) -> str | None:
        return f"{self.http_url}{PLAYGROUND_PATH}" if self.settings.playground else None

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        host = self.settings.host
        return "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host  # noqa: S104

    def start(self, timeout_s: float = 30.0) -> Front:
        if self._thread is not None:
            raise FrontStartupError("already started")
        # httpx logs every request at INFO; the front's access log already has one line per request.
        logging.getLogger("httpx").setLevel(max(logging.getLogger("httpx").getEffectiveLevel(), logging.WARNING))
        self._started.clear()
        self._failure = None
        self._thread = threading.Thread(target=self._run, name="blip2-front", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            self.stop()
            raise FrontStartupError(f"front not serving after {timeout_s:g} s")
        if self._failure is not None:
            self._thread.join(5.0)
            self._thread = None
            raise FrontStartupError(f"front failed to start: {self._failure}") from self._failure
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Stops listening, lets requests in flight finish (up to `shutdown_grace_s`), then returns."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout_s if timeout_s is not None else self.settings.shutdown_grace_s + 10.0)
        if thread.is_alive():
            log.warning("front did not stop in time")
        self._thread = None

    def __enter__(self) -> Front:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported to start(); a failure after start is logged
            if not self._started.is_set():
                self._failure = e
                self._started.set()
            else:
                log.exception("front stopped on an error")

    async def _main(self) -> None:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        metrics = FrontMetrics()
        budget = ByteBudget(s.max_inflight_bytes, s.inflight_wait_s)
        metrics.in_flight_bytes.set_function(lambda: budget.in_use)
        state = FrontState(settings=s, metrics=metrics, budget=budget, ready=self.ready)
        # trust_env off: Triton is on loopback, never behind the environment's HTTP proxy.
        triton_http = httpx.AsyncClient(
            timeout=httpx.Timeout(s.request_timeout_s, connect=5.0), trust_env=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        image_client = httpx.AsyncClient(timeout=s.image_fetch_timeout_s, follow_redirects=False)
        channel = grpc.aio.insecure_channel(s.triton_grpc, options=CHANNEL_OPTIONS)
        resources: list[Any] = []
        grpc_server: grpc.aio.Server | None = None
        try:
            gateway = Gateway(state, channel, image_client)
            grpc_server = grpc.aio.server(options=server_options(state))
            grpc_server.add_generic_rpc_handlers((GrpcProxy(state, channel),))
            self.grpc_port = grpc_server.add_insecure_port(f"{s.host}:{s.grpc_port}")
            if not self.grpc_port:
                raise FrontStartupError(f"cannot listen on {s.host}:{s.grpc_port} (gRPC)")
            sockets = [_bind(s.host, s.http_port)]
            self.http_port = sockets[0].getsockname()[1]
            if s.openai_port >= 0:
                sockets.append(_bind(s.host, s.openai_port))
                self.openai_port = sockets[1].getsockname()[1]
            config = uvicorn.Config(
                build_app(state, triton_http, gateway), lifespan="off", log_config=None, access_log=False,
                server_header=False, timeout_graceful_shutdown=math.ceil(s.shutdown_grace_s),
                http="httptools" if _has_httptools() else "h11")
            http_server = uvicorn.Server(config)
            if s.metrics_port >= 0:
                metrics_server, _ = start_wsgi_server(s.metrics_port, s.host, registry=metrics.registry)
                resources.append(metrics_server)
                self.metrics_port = metrics_server.server_port
            await grpc_server.start()
            serving = asyncio.create_task(http_server.serve(sockets=sockets))
            while not http_server.started:
                if serving.done():
                    serving.result()
                    raise FrontStartupError("HTTP server ended during startup")
                await asyncio.sleep(0.01)
            log.info("front serving: HTTP :%d, gRPC :%d, metrics :%s -> Triton HTTP %s, gRPC %s", self.http_port,
                     self.grpc_port, self.metrics_port if self.metrics_port is not None else "off", s.triton_http,
                     s.triton_grpc)
            self._started.set()
            await self._stop.wait()
            # Both listeners close at once; requests in flight get the grace period.
            http_server.should_exit = True
            await asyncio.gather(serving, grpc_server.stop(s.shutdown_grace_s), return_exceptions=True)
        finally:
            if grpc_server is not None:
                await grpc_server.stop(0)  # a no-op after a clean stop; ends a half-started server
            for server in resources:
                server.shutdown()
                server.server_close()
            await triton_http.aclose()
            await image_client.aclose()
            await channel.close()


def _has_httptools() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True
