#!/usr/bin/env bash
# The GPU machine's checks in one command (tests, training-step timing and MFU, data wait, host syncs,
# `mixer predict`): see benchmarks/gpu_check.py. Under 10 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [--out gpu_check.json] [--skip-tests]
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu_check.json   # on the CPU, tiny sizes (about a minute)
#
# Installs nothing but this project (`pip install -e ".[test]"`, only when its imports fail). PYTHON picks the
# interpreter (default: python3, or the project's .venv when there is one and none is active).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import mixer, pipeline.cli, pytest, torch" 2>/dev/null; then
    echo "gpu_check: installing this project: $PYTHON -m pip install -e \".[test]\"" >&2
    "$PYTHON" -m pip install --quiet -e ".[test]"
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
