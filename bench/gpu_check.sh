#!/usr/bin/env bash
# The GPU paths in one run (bench/gpu_check.py says what it checks); one table on stdout, logs in --out.
#   bash bench/gpu_check.sh --out gpu_check        # on a GPU machine, after bench/gpu_wheels.sh here
#   bash bench/gpu_check.sh --cpu --out /tmp/gc    # every step a CPU can run, at toy sizes
# On a machine without internet the packages it lacks come from .whl/ (bench/gpu_wheels.sh fills it).
# .whl/ and .cache/ (tiny-random) travel with the tree. --out holds GiBs of models: keep it off a
# folder that is copied back, and bring back its top-level files (logs, table, tracebacks) in one:
#   bash bench/gpu_check.sh --out /tmp/gc; find /tmp/gc -maxdepth 1 -type f | tar -czf gc.tgz -T -
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -d .whl ] && [[ " $* " != *" --cpu "* ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export AUTOMEM_CACHE=${AUTOMEM_CACHE:-$PWD/.cache}   # tiny-random, built here by gpu_wheels.sh and carried
exec "$PYTHON" bench/gpu_check.py "$@"
