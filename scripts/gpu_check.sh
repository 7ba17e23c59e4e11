#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py; its docstring says what each stage does).
#   bash scripts/gpu_check.sh prepare            # here, with a registry: fills outputs/gpu_wheels/ (ignored)
#   bash scripts/gpu_check.sh run --out "$OUT"   # on the CUDA machine, outputs/gpu_wheels carried along
# `run` exits 0 when every stage passed, 1 when one failed, 3 where there is no CUDA (stopped before the build).
# The interpreter: $PYTHON if set, else this checkout's .venv (prepare, local tries), else python3 (the CUDA
# machine's torch environment, where the wheels get installed).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
exec "$py" scripts/gpu_check.py "$@"
