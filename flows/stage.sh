#!/bin/sh
# Run one stage flow (`python -m flows.<stage> <args>`) with the project's Python, whichever `python` is first on
# PATH: $FLEXKD_PYTHON if set (the pipeline flow sets it to its own interpreter), else the project's .venv (what
# `make install` builds), else python3 on PATH (a container image with the stack installed system-wide).
# dvc.yaml calls it for every stage, so that `.venv/bin/dvc repro` works without an activated venv.
set -e
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${FLEXKD_PYTHON:-}" ]; then
  py=$FLEXKD_PYTHON
elif [ -x "$root/.venv/bin/python" ]; then
  py=$root/.venv/bin/python
else
  py=$(command -v python3 || command -v python)
fi
stage=$1
shift
exec "$py" -m "flows.$stage" "$@"
