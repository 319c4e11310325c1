#!/usr/bin/env bash
# Starts tritonserver with the flags every deployment of this image relies on (docker run, compose and
# Kubernetes all go through here), so hardening and metrics settings cannot drift between them.
# Extra tritonserver flags: the BLIP2_TRITON_ARGS variable (word-split) and this script's arguments.
set -euo pipefail

# Same variable (and default location) the blip2-triton launcher uses.
model_repository="${BLIP2_MODEL_REPOSITORY:-/opt/blip2/model_repository}"

# Weights baked in at build time (BAKE_MODEL_ID) live in a plain directory; use them whenever the requested
# model is the one that was baked, instead of downloading it again into the cache volume.
baked_dir=/opt/blip2/weights
if [[ -f "${baked_dir}/.baked-model-id" && "${BLIP2_MODEL_ID:-}" == "$(<"${baked_dir}/.baked-model-id")" ]]; then
    export BLIP2_MODEL_ID="${baked_dir}"
fi

# Model control, shared-memory registration, tracing and logging settings are admin APIs: loading models or
# mapping shared memory from a client, or writing trace files, must not be possible for inference callers.
# Triton has no switch to turn them off, only a required header; without an operator-supplied key we use a
# random one nobody knows, which leaves them unusable.
admin_key="${TRITON_ADMIN_KEY:-}"
if [[ -z "${admin_key}" ]]; then
    admin_key="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
fi
restricted="model-repository,shared-memory,trace,logging:triton-admin-key=${admin_key}"

extra_args=()
if [[ -n "${BLIP2_TRITON_ARGS:-}" ]]; then
    read -r -a extra_args <<<"${BLIP2_TRITON_ARGS}"
fi

# Triton 2.51 keeps reporting ready and live after a stage's Python stub process died, while every request fails,
# and on SIGTERM fails ensemble requests still in flight. The watchdog wrapper (python -m blip2_triton.watchdog,
# docs/ROBUSTNESS.md) kills the server when a stub dies, so the container exits (status 70) and the orchestrator
# restarts it, and on SIGTERM drains in-flight requests before Triton stops its models. It runs tritonserver as
# its child and forwards signals. BLIP2_WATCHDOG: 1 = required (the image sets it), 0 = off, unset = when
# importable.
watchdog=()
case "${BLIP2_WATCHDOG:-auto}" in
    0 | false | off) ;;
    *)
        if python3 -c "import blip2_triton.watchdog" 2>/dev/null; then
            watchdog=(python3 -m blip2_triton.watchdog --)
        elif [[ "${BLIP2_WATCHDOG:-auto}" == auto ]]; then
            echo "entrypoint: blip2_triton is not importable; running tritonserver without the stub watchdog" >&2
        else
            echo "entrypoint: BLIP2_WATCHDOG=${BLIP2_WATCHDOG} but blip2_triton.watchdog is not importable" >&2
            exit 1
        fi
        ;;
esac

exec "${watchdog[@]}" "${TRITONSERVER:-tritonserver}" \
    --model-repository="${model_repository}" \
    --model-control-mode=none \
    --strict-readiness=true \
    --http-port="${TRITON_HTTP_PORT:-8000}" \
    --grpc-port="${TRITON_GRPC_PORT:-8001}" \
    --metrics-port="${TRITON_METRICS_PORT:-8002}" \
    --allow-metrics=true \
    --allow-cpu-metrics=true \
    --metrics-config=summary_latencies=true \
    --http-restricted-api="${restricted}" \
    --grpc-restricted-protocol="${restricted}" \
    --exit-timeout-secs="${TRITON_EXIT_TIMEOUT_SECS:-30}" \
    "${extra_args[@]}" \
    "$@"
