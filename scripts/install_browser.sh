#!/usr/bin/env bash
# Installs what the playground's browser test drives (tests/integration/test_playground.py): Debian's chromium and
# its chromedriver. Does nothing when both are on PATH. Needs root (or sudo) and the Debian package mirrors; says
# so and exits 1 when it cannot install them.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "browser: $(chromium --version 2>/dev/null); $(chromedriver --version | cut -d' ' -f1-2)"
    exit 0
fi
if [[ "$(id -u)" == 0 ]]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "browser: chromium and chromedriver are missing and this user cannot install them; as root run:" >&2
    echo "browser:   apt-get install -y --no-install-recommends chromium chromium-driver" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser: no apt-get here; install chromium and its chromedriver (or a Chrome and its driver, named by" \
        "BLIP2_CHROMIUM and BLIP2_CHROMEDRIVER) by other means" >&2
    exit 1
fi
echo "browser: installing chromium and chromium-driver (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
if ! { "${as_root[@]}" apt-get update -qq && \
        "${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }; then
    echo "browser: apt-get could not install chromium and chromium-driver (see above)" >&2
    exit 1
fi
echo "browser: $(chromium --version 2>/dev/null); $(chromedriver --version | cut -d' ' -f1-2)"
