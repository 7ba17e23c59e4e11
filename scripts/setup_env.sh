# Sourced by quickstart.sh and run_tests.sh: activate (or create) the project's virtual environment and install
# the pinned CPU torch first, so that no requirement can pull a CUDA build of torch.
# Usage: source scripts/setup_env.sh <requirements file>
set -euo pipefail
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating virtual environment .venv"
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
echo "[setup] installing torch==2.13.0 and $1 into $VIRTUAL_ENV"
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -r "$1"
