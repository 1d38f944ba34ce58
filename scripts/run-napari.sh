#!/usr/bin/env bash
# Install everything into .venv and open napari with the plugin, its sample data and the Points to masks widget.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_common.sh
# shellcheck disable=SC2086
ensure_debs $RUNTIME_DEBS
ensure_venv
pip_install qt
exec .venv/bin/nucsynth napari "$@"
