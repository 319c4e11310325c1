#!/usr/bin/env bash
# Installs the system tools integration tests drive: Debian's chromium and its chromedriver (the playground's
# browser test) and curl (the README's curl examples, tests/integration/test_readme.py). Does nothing when all are
# on PATH. Needs root (or sudo) and the Debian package mirrors; says
# so and exits 1 when it cannot install them.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && command -v curl >/dev/null 2>&1; then
    echo "browser: $(chromium --version 2>/dev/null); $(chromedriver --version | cut -d' ' -f1-2)"
    exit 0
fi
if [[ "$(id -u)" == 0 ]]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "browser: chromium, chromedriver or curl is missing and this user cannot install them; as root run:" >&2
    echo "browser:   apt-get install -y --no-install-recommends chromium chromium-driver curl" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser: no apt-get here; install chromium and its chromedriver (or a Chrome and its driver, named by" \
        "BLIP2_CHROMIUM and BLIP2_CHROMEDRIVER) by other means" >&2
    exit 1
fi
echo "browser: installing chromium, chromium-driver and curl (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
if ! { "${as_root[@]}" apt-get update -qq && \
        "${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver curl >/dev/null; }; then
    echo "browser: apt-get could not install chromium, chromium-driver and curl (see above)" >&2
    exit 1
fi
echo "browser: $(chromium --version 2>/dev/null); $(chromedriver --version | cut -d' ' -f1-2)"
