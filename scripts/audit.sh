#!/usr/bin/env bash
# Dependency vulnerability audit: pip-audit over the installed environment (the project venv when present), i.e.
# exactly the versions tests ran against. Known advisories come from the vulnerability service (PyPI's JSON
# API by default, or OSV: PIP_AUDIT_VULNERABILITY_SERVICE=osv), so the audit needs network access to it; when
# the service is unreachable the audit is skipped with a message and exit status 0, unless AUDIT_REQUIRED=1.
#
# Findings that are accepted on purpose go in scripts/pip-audit-ignore.txt, one advisory id per line with the
# reason after a '#'; everything else fails the audit (exit 1).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"

if [[ -x "${root}/.venv/bin/pip-audit" ]]; then
    pip_audit="${root}/.venv/bin/pip-audit"
    python="${root}/.venv/bin/python"
elif command -v pip-audit >/dev/null 2>&1; then
    pip_audit="$(command -v pip-audit)"
    python="$(command -v python3)"
else
    echo "audit: pip-audit not found; install the dev dependencies (pip install -e '.[dev]')" >&2
    exit 1
fi

service="${PIP_AUDIT_VULNERABILITY_SERVICE:-pypi}"
case "${service}" in
    pypi) probe="${AUDIT_PROBE_URL:-https://pypi.org/pypi/pip/json}" ;;
    osv) probe="${AUDIT_PROBE_URL:-https://api.osv.dev/}" ;;
    *)
        echo "audit: unknown vulnerability service '${service}' (pypi or osv)" >&2
        exit 2
        ;;
esac

if ! "${python}" - "${probe}" <<'PY'; then
import sys
import urllib.error
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1], timeout=10)
except urllib.error.HTTPError:
    pass  # the service answered: it is reachable
except Exception as e:
    print(f"audit: {sys.argv[1]} unreachable ({e})", file=sys.stderr)
    sys.exit(1)
PY
    if [[ "${AUDIT_REQUIRED:-0}" == 1 ]]; then
        echo "audit: vulnerability service unreachable and AUDIT_REQUIRED=1" >&2
        exit 1
    fi
    echo "audit: SKIPPED - the ${service} vulnerability service is unreachable from here; no audit was done" >&2
    exit 0
fi

ignores=()
if [[ -f scripts/pip-audit-ignore.txt ]]; then
    while read -r id _; do
        [[ -z "${id}" || "${id}" == \#* ]] && continue
        ignores+=(--ignore-vuln "${id}")
    done <scripts/pip-audit-ignore.txt
fi

echo "audit: pip-audit of $("${python}" -c 'import sys; print(sys.prefix)') against ${service}"
# --skip-editable: this project's own packages (blip2-triton, blip2-client) are not on any index.
exec "${pip_audit}" --progress-spinner off --skip-editable --vulnerability-service "${service}" \
    --desc on "${ignores[@]}"
