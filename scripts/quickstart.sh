#!/usr/bin/env bash
# Quick start: install the requirements, then generate the phantom datasets, train both bundles briefly, evaluate
# and run inference on a held-out case, both bundles at once (under 10 minutes on 2 CPU cores, installation included).
# Extra arguments go to quickstart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements.txt
python scripts/quickstart.py "$@"
