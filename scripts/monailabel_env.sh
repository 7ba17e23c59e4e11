#!/usr/bin/env bash
# Create (or update) a separate virtual environment for MONAI Label 0.8.5 next to the CPU-only torch 2.13.0.
#
# MONAI Label needs versions the project's main .venv must not take (numpy<2 via pydicom-seg, jsonschema<4,
# pydicom<3), so it gets its own venv. What this script does, in order:
#   1. creates the venv (default <repo>/.venv-monailabel; override with $MONAILABEL_VENV or the first argument);
#   2. installs torch==2.13.0 FIRST, then writes a pip constraints file (torch==2.13.0, monai==1.6.1, pydicom<3)
#      and exports PIP_CONSTRAINT, so that neither the main resolve nor sam2's isolated source build can ever
#      re-resolve torch (which would pull a multi-GB CUDA build);
#   3. installs monailabel==0.8.5 (+ monai 1.6.1). "pydicom<3" is the one fix pin: pydicom-seg 0.4.1 (imported
#      at server start-up even for a NIfTI datastore) needs pydicom 2.x; pip then picks dicomweb-client 0.60.1
#      and pynetdicom 2.1.1 itself;
#   4. installs scripts/torchvision_cpu_compat.py (+ a .pth line) into THIS venv only: PyPI's torchvision 0.28.0
#      is a CUDA build that cannot be imported with a CPU torch; the shim makes its pure-Python part importable
#      (MONAI Label only needs torchvision.utils). With a working torchvision the shim is a no-op.
#   5. installs dcmqi (PyPI) and writes <venv>/bin/itkimage2segimage, a wrapper that runs dcmqi's binary with
#      "--skip 0": a DICOMweb-backed MONAI Label writes each final label as a DICOM SEG with the itkimage2segimage
#      it finds on PATH (without one it downloads dcmqi from GitHub at start-up) and passes no --skip, and dcmqi
#      leaves empty slices out by default; pydicom-seg, which MONAI Label reads SEGs back with, then rebuilds the
#      label on the labelled slices only (64 x 64 x 16 for a 64 x 64 x 48 series), which no longer fits its image;
#   6. writes a stamp; a second call with the same recipe only checks the stamp and returns in about a second.
#
# Usage:  bash scripts/monailabel_env.sh [VENV_DIR]
# Env:    PYTHON (default python3, must be 3.10-3.12), TORCH_PIP_ARGS (extra pip args for the torch install, e.g.
#         "--index-url https://download.pytorch.org/whl/cpu" where no local CPU wheel is configured).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${MONAILABEL_VENV:-$REPO/.venv-monailabel}}"
PYTHON="${PYTHON:-python3}"
SHIM="$REPO/scripts/torchvision_cpu_compat.py"
STAMP="$VENV/.monailabel-env-stamp"

RECIPE="torch==2.13.0 monai==1.6.1 monailabel==0.8.5 pydicom<3 dcmqi | $(cat "${BASH_SOURCE[0]}" "$SHIM" | sha256sum)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$RECIPE" ] && [ -x "$VENV/bin/monailabel" ]; then
  echo "[monailabel-env] up to date: $VENV"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[monailabel-env] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
quiet_pip() { grep -v "^WARNING: Location 'file:.*' is ignored" || true; }  # local index mirrors are noisy
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "[monailabel-env] installing torch==2.13.0 first"
# shellcheck disable=SC2086
"$PY" -m pip install --quiet ${TORCH_PIP_ARGS:-} torch==2.13.0 2>&1 | quiet_pip

CONSTRAINTS="$VENV/monailabel-constraints.txt"
cat > "$CONSTRAINTS" <<'EOF'
# Written by scripts/monailabel_env.sh and passed to every pip call as PIP_CONSTRAINT (build isolation included).
torch==2.13.0
monai==1.6.1
pydicom<3
EOF
export PIP_CONSTRAINT="$CONSTRAINTS"

echo "[monailabel-env] installing monailabel==0.8.5 monai==1.6.1 (constraints: $CONSTRAINTS)"
"$PY" -m pip install --quiet monailabel==0.8.5 monai==1.6.1 2>&1 | quiet_pip

echo "[monailabel-env] installing dcmqi (MONAI Label's DICOM SEG writer) behind a --skip 0 wrapper"
"$PY" -m pip install --quiet dcmqi 2>&1 | quiet_pip
DCMQI_BIN="$("$PY" -c 'import dcmqi, pathlib; print(pathlib.Path(dcmqi.__file__).parent / "bin")')"
printf '#!/bin/sh\n# Written by scripts/monailabel_env.sh: dcmqi'"'"'s itkimage2segimage encoding every slice.\nexec "%s" --skip 0 "$@"\n' \
  "$DCMQI_BIN/itkimage2segimage" > "$VENV/bin/itkimage2segimage"
chmod 755 "$VENV/bin/itkimage2segimage"

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$SHIM" "$SITE/torchvision_cpu_compat.py"
echo "import torchvision_cpu_compat" > "$SITE/torchvision_cpu_compat.pth"

echo "[monailabel-env] checking imports"
"$PY" - <<'EOF'
import importlib.metadata as md

import monai
import torch
import torchvision.utils  # noqa: F401  (works through the shim with a CPU torch)
import monailabel.app  # noqa: F401  (the FastAPI server: imports pydicom_seg, torchvision.utils, ...)

packages = ("torch", "torchvision", "monai", "monailabel", "numpy", "pydicom", "pydicom-seg")
versions = {p: md.version(p) for p in packages}
print("[monailabel-env] " + ", ".join(f"{k} {v}" for k, v in versions.items()))
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert monai.__version__ == "1.6.1", monai.__version__
EOF
echo "$RECIPE" > "$STAMP"
echo "[monailabel-env] ready in $(( $(date +%s) - start )) s: $VENV ($(du -sh "$VENV" | cut -f1))"
