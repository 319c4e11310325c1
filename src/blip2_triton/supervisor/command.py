"""The tritonserver command line and environment, built here only: `TritonServer` uses them for
`blip2-triton serve`, the container (which runs `blip2-triton serve`), tests and benchmarks alike."""

from __future__ import annotations

from collections.abc import Mapping

from ..options import DEFAULT_ENV_PREFIX, ITM_ENV_PREFIX, T5_ENV_PREFIX, env_var
from .install import TritonInstall
from .settings import LaunchSettings

# Triton's admin APIs: model load/unload and repository index, shared-memory registration, trace and log
# settings. Inference callers must not reach them; Triton cannot switch them off, only require a header.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_KEY_HEADER = "triton-admin-key"
WILDCARDS = ("0.0.0.0", "", "::")  # noqa: S104  (compared against, never bound)


def restricted_api_args(admin_key: str) -> list[str]:
    spec = f"{','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={admin_key}"
    return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]


def tritonserver_command(settings: LaunchSettings, install: TritonInstall) -> list[str]:
    cmd = [
        str(install.binary),
        *(f"--model-repository={repo}" for repo in settings.repositories()),
        f"--http-port={settings.http_port}",
        f"--grpc-port={settings.grpc_port}",
        f"--metrics-port={settings.metrics_port}",
        f"--exit-timeout-secs={settings.exit_timeout_s}",
        # Clients cannot load or unload models on a serving replica, and the stub watchdog needs a fixed model set.
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--log-verbose=0",
        "--allow-metrics=true",
        "--allow-cpu-metrics=true",
        # Exports the *_summary_us latency quantiles the dashboard's p50/p99 panels read.
        "--metrics-config=summary_latencies=true",
        # A stub's tensor region that never needs to grow under normal load: growing remaps it while the LLM
        # engine's thread may hold tensors in it. Pages are only used when touched.
        "--backend-config=python,shm-default-byte-size=67108864",
        "--backend-config=python,shm-growth-byte-size=16777216",
    ]
    if settings.host not in WILDCARDS:
        cmd += [f"--http-address={settings.host}", f"--grpc-address={settings.host}"]
    if settings.metrics_host is not None:
        cmd.append(f"--metrics-address={settings.metrics_host or '0.0.0.0'}")  # noqa: S104  (Prometheus scrapes it)
    if install.backend_directory is not None:
        cmd.append(f"--backend-directory={install.backend_directory}")
    own_restrictions = any(a.startswith(("--http-restricted-api", "--grpc-restricted-protocol"))
                           for a in settings.extra_args)
    if settings.restrict_admin_apis and not own_restrictions:
        cmd += restricted_api_args(settings.admin_key)
    return cmd + list(settings.extra_args)


def stage_environment(settings: LaunchSettings, install: TritonInstall, base: Mapping[str, str]) -> dict[str, str]:
    """tritonserver's environment, which its stage processes read their `ServerOptions` from."""
    env = {**base, **install.env}
    prefixes = (DEFAULT_ENV_PREFIX, T5_ENV_PREFIX, ITM_ENV_PREFIX)
    for name, value in settings.options.items():
        env.update({env_var(name, prefix): value for prefix in prefixes})
    for prefix, model_id in zip(prefixes, (settings.model_id, settings.t5_model_id, settings.itm_model_id),
                                strict=True):
        if model_id is not None:
            env[env_var("model_id", prefix)] = model_id
    env.update(settings.env)
    served = [DEFAULT_ENV_PREFIX, *([T5_ENV_PREFIX] if settings.serves_t5 else []),
              *([ITM_ENV_PREFIX] if settings.serves_itm else [])]
    if len(served) > 1:
        # The computing stage processes of every family served share the cores: two per captioning family (vision,
        # LLM), three for retrieval (image, text, match). An operator's value for any family serves all; an empty
        # one counts as unset, as the options read it.
        names = [env_var("cpu_stages", prefix) for prefix in served]
        stages = 2 + 2 * settings.serves_t5 + 3 * settings.serves_itm
        value = next((env[name] for name in names if env.get(name)), str(stages))
        env.update({name: env.get(name) or value for name in names})
    return env
