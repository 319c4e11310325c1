"""What the supervisor starts tritonserver with. `LaunchSettings.from_env` is what `blip2-triton serve`, and so
the container, starts from; the stages' own options are `ServerOptions` (options.py)."""

from __future__ import annotations

import secrets
import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..options import ServerOptions

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# Source checkout first (<root>/src/blip2_triton -> <root>/...), then the container image's copy.
REPOSITORY_ROOTS = (PACKAGE_ROOT.parent.parent, Path("/opt/blip2"))


class LauncherError(RuntimeError):
    pass


class StartupInterruptedError(LauncherError):
    """A stop was requested while tritonserver was still starting; it has been stopped."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setting(default: Any, env: str, help: str, *, shown: str | None = None, secret: bool = False) -> Any:
    """A field `from_env` reads from `env`; `help` (and `shown`, for a default that is not a plain value) feed
    the README's table."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"env": env, "help": help, "shown": shown}, repr=not secret)


def _parse(kind: str, raw: str) -> Any:
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        return raw.strip().lower() not in ("0", "false", "no", "off")
    if kind.startswith("tuple"):
        return tuple(shlex.split(raw))
    return Path(raw) if kind.startswith("Path") else raw


@dataclass(frozen=True)
class LaunchSettings:
    # `setting` returns a dataclasses.field (RUF009 cannot tell).
    model_repository: Path | None = setting(  # noqa: RUF009
        None, "BLIP2_MODEL_REPOSITORY", "model repository served", shown="the checkout's, else `/opt/blip2`'s")
    t5_model_repository: Path | None = setting(  # noqa: RUF009
        None, "BLIP2_T5_MODEL_REPOSITORY", "FlanT5 repository served beside it (`serve --t5`)",
        shown="likewise, `model_repository_t5`")
    itm_model_repository: Path | None = setting(  # noqa: RUF009
        None, "BLIP2_ITM_MODEL_REPOSITORY", "retrieval repository served beside it (`serve --itm`)",
        shown="likewise, `model_repository_itm`")
    host: str = setting("127.0.0.1", "TRITON_HOST", "address the HTTP, gRPC and metrics ports clients reach bind to "
                        "(the image sets `0.0.0.0`)")
    http_port: int = setting(8000, "TRITON_HTTP_PORT", "HTTP port clients reach (the front's)")
    grpc_port: int = setting(8001, "TRITON_GRPC_PORT", "gRPC port clients reach (the front's)")
    metrics_port: int = setting(8002, "TRITON_METRICS_PORT", "Triton's Prometheus metrics port")
    front: bool = setting(True, "BLIP2_FRONT", "clients reach Triton through the front (limits, OpenAI API, honest "
                          "readiness; `BLIP2_FRONT_*`), Triton listening on loopback; `0`: Triton directly",
                          shown="`1`")
    triton_http_port: int = setting(0, "BLIP2_TRITON_HTTP_PORT", "Triton's own HTTP port on loopback, behind the "
                                    "front; `0`: a free port")
    triton_grpc_port: int = setting(0, "BLIP2_TRITON_GRPC_PORT", "Triton's own gRPC port on loopback, behind the "
                                    "front; `0`: a free port")
    # Where the metrics port binds when HTTP and gRPC do not (Triton behind the front); None: with them.
    metrics_host: str | None = None
    exit_timeout_s: int = setting(30, "TRITON_EXIT_TIMEOUT_SECS", "bound on a stop: drain plus Triton's shutdown")
    admin_key: str = setting(lambda: secrets.token_hex(32), "TRITON_ADMIN_KEY",
                             "key of Triton's admin APIs (`triton-admin-key` header)", shown="random: APIs closed",
                             secret=True)
    extra_args: tuple[str, ...] = setting((), "BLIP2_TRITON_ARGS", "extra `tritonserver` flags, shell-split",
                                          shown="none")
    watchdog: bool = setting(True, "BLIP2_WATCHDOG", "end the server when a stage's stub process dies; `0`: off",
                             shown="`1`")
    # Stage settings passed to tritonserver's environment: the OPT and FlanT5 checkpoints (None: as the
    # environment says) and other `ServerOptions` fields for every family (dtype, device, quantization, ...).
    model_id: str | None = None
    t5_model_id: str | None = None
    with_t5: bool = False
    # The retrieval models (model_repository_itm) are served when either is set: the stages read the same
    # variable, so a container enables them by setting the checkpoint alone.
    itm_model_id: str | None = setting(None, "BLIP2_ITM_MODEL_ID", "retrieval checkpoint (`serve --itm-model-id`): "
                                       "serves `blip2_embed_image`, `blip2_embed_text`, `blip2_similarity`, "
                                       "`blip2_match` beside the captioning models", shown="unset")
    with_itm: bool = setting(False, "BLIP2_SERVE_ITM", "`1`: serve the retrieval models on the embedded tiny "
                             "retrieval checkpoint unless `BLIP2_ITM_MODEL_ID` is set (`serve --itm`)", shown="`0`")
    options: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    startup_timeout_s: float = setting(1800.0, "BLIP2_STARTUP_TIMEOUT_S", "seconds tritonserver may take to become "
                                       "ready, checkpoint download included")
    restrict_admin_apis: bool = True
    # The restart budget of `lifecycle.supervise`: at most `max_restarts` within `restart_window_s`.
    max_restarts: int = 0
    restart_window_s: float = 600.0
    watchdog_interval_s: float = 0.5
    drain_quiet_s: float = 1.0

    def __post_init__(self) -> None:
        unknown = set(self.options) - ({f.name for f in fields(ServerOptions)} - {"model_id"})
        if unknown:
            raise LauncherError(f"options: not stage options: {sorted(unknown)} (model ids have their own fields)")

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> LaunchSettings:
        """Settings for serving: the environment's, else the defaults."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata.get("env", ""))
            if raw:
                try:
                    values[f.name] = _parse(str(f.type).split(" |")[0], raw)
                except ValueError as e:
                    raise LauncherError(f"{f.metadata['env']}: expected {f.type}, got {raw!r}") from e
        return cls(**{**values, **overrides})

    @classmethod
    def on_free_ports(cls, **values: Any) -> LaunchSettings:
        return cls(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), **values)

    def behind_front(self) -> LaunchSettings:
        """The settings tritonserver starts with when the front takes the public ports: HTTP and gRPC on loopback
        (on the given or free ports), metrics where clients reach them."""
        return replace(self, host="127.0.0.1", http_port=self.triton_http_port or free_port(),
                       grpc_port=self.triton_grpc_port or free_port(), metrics_host=self.host, front=False)

    @property
    def serves_t5(self) -> bool:
        return self.with_t5 or self.t5_model_id is not None

    @property
    def serves_itm(self) -> bool:
        return self.with_itm or self.itm_model_id is not None

    def repositories(self) -> list[Path]:
        found = [self.model_repository or _find_repository("model_repository", "blip2")]
        if self.serves_t5:
            found.append(self.t5_model_repository or _find_repository("model_repository_t5", "blip2_t5"))
        if self.serves_itm:
            found.append(self.itm_model_repository or _find_repository("model_repository_itm", "blip2_embed_image"))
        return found

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """(variable, default, meaning) of every setting `from_env` reads."""
        defaults = cls.from_env({})
        return [(f.metadata["env"], f.metadata["shown"] or f"`{getattr(defaults, f.name)}`", f.metadata["help"])
                for f in fields(cls) if "env" in f.metadata]


def _find_repository(folder: str, ensemble: str) -> Path:
    for root in REPOSITORY_ROOTS:
        if (root / folder / ensemble / "config.pbtxt").exists():
            return root / folder
    raise LauncherError(f"no model repository with {ensemble!r} found in {', '.join(map(str, REPOSITORY_ROOTS))}")
