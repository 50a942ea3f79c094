#!/usr/bin/env bash
# Every GPU check of the samplers in one run (under 8 minutes on an H100/H200): see bench/device_check.py.
#   bash bench/device_check.sh                       # cuda, release sizes; log and JSON into ./device_check/
#   bash bench/device_check.sh --device cpu --quick  # tiny networks on CPU: every code path runs
set -euo pipefail
cd "$(dirname "$0")/.."
out="${DEVICE_CHECK_OUT:-device_check}"
mkdir -p "$out"
# A hard stop short of 8 minutes; whatever was printed by then stays in the log.
timeout "${DEVICE_CHECK_TIMEOUT:-470}" "${PYTHON:-python}" bench/device_check.py --json "$out/device_check.json" "$@" \
    2>&1 | tee "$out/device_check.log"
