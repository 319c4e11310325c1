#!/usr/bin/env bash
# Container entrypoint: picks baked-in weights, then becomes `blip2-triton serve` (PID 1), the same supervisor and
# tritonserver command line as outside the container (docs/DEPLOY.md). Settings come from the environment
# (README, "Options"); this script's arguments are extra tritonserver flags.
set -euo pipefail

# Weights baked in at build time (BAKE_MODEL_ID) live in a plain directory; use them whenever the requested
# model is the one that was baked, instead of downloading it again into the cache volume.
baked_dir=/opt/blip2/weights
if [[ -f "${baked_dir}/.baked-model-id" && "${BLIP2_MODEL_ID:-}" == "$(<"${baked_dir}/.baked-model-id")" ]]; then
    export BLIP2_MODEL_ID="${baked_dir}"
fi

exec blip2-triton serve -- "$@"
