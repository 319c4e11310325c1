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

exec "${TRITONSERVER:-tritonserver}" \
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
