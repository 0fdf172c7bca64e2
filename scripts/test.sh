#!/usr/bin/env bash
# The whole test suite against real parts (swtpm, the broker, openssl, nginx).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh
exec .venv/bin/pytest "$@"
