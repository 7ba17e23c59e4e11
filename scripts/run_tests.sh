#!/usr/bin/env bash
# Install the test requirements and run the whole test suite (unit and integration tests).
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not integration"`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements-dev.txt
python -m pytest "$@"
