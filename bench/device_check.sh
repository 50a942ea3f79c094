#!/usr/bin/env bash
# Every GPU check of the samplers in one run (under 8 minutes on an H100/H200): see bench/device_check.py.
#   bash bench/device_check.sh                       # cuda, release sizes; log and JSON into ./device_check/
#   bash bench/device_check.sh --device cpu --quick  # tiny networks on CPU: every code path runs
# Runs from a plain copy of the repository: the script puts the repository on sys.path itself (no install needed),
# and takes $PYTHON, else python3, else python.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$python" ]; then
    echo "device_check: no python3 or python on PATH (set PYTHON)" >&2
    exit 127
fi
out="${DEVICE_CHECK_OUT:-device_check}"
mkdir -p "$out"
# A hard stop short of 8 minutes; every row is in the log (and the JSON) as soon as it is measured.
PYTHONUNBUFFERED=1 timeout "${DEVICE_CHECK_TIMEOUT:-470}" "$python" bench/device_check.py \
    --json "$out/device_check.json" "$@" 2>&1 | tee "$out/device_check.log"
