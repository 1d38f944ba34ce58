#!/usr/bin/env bash
# Install what the tests need (Xvfb through apt where missing) and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_common.sh
# shellcheck disable=SC2086
ensure_debs $RUNTIME_DEBS $TEST_DEBS
ensure_venv
pip_install qt,testing
exec .venv/bin/python -m pytest "$@"
