"""The ``monailabel`` benchmark of ``scripts/benchmark_speed.py``: what one MONAI Label training round costs.

For each bundle it does what the README's MONAI Label section does, on a server of its own: the bundle copied into
the ``monaibundle`` app with random weights at the chosen widths, the phantom studies of ``monailabel_server.py
studies`` labelled for that bundle, ``POST /train/<bundle>?run_sync=true`` with one epoch; then it records the
request's wall time, the files the round left in the copied bundle's ``models/`` and whether the served
``models/model.pt`` changed. The server is stopped afterwards, also on error.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import monailabel_server as server
from speed_common import DEFAULT_OUT_DIR, environment, write_and_print

DEFAULT_WORK_DIR = server.REPO / "outputs" / "speed_monailabel"
STUDIES = {"ceds_mediastinum": {"n_ct": 2, "n_liver": 0, "labelled": "ct"},
           "cdugjl_liver": {"n_ct": 0, "n_liver": 2, "labelled": "liver"}}
"""The phantom studies of each bundle's round (those of the README's ``serve``, of one modality)."""


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _files_mb(folder: Path) -> dict[str, float]:
    """Size in MB of every file under ``folder`` (relative names)."""
    return {str(p.relative_to(folder)): p.stat().st_size / 2**20 for p in sorted(folder.rglob("*")) if p.is_file()}


def training_round(bundle: str, widths: str, max_epochs: int, work_dir: Path, venv: str,
                   timeout: float = 3600) -> dict[str, Any]:
    """One MONAI Label training round of ``bundle`` on a server started for it.

    Args:
        bundle: "ceds_mediastinum" or "cdugjl_liver".
        widths: "paper" (the bundle's configs) or "cpu_demo" (``configs/cpu_demo.json`` merged).
        max_epochs: the request's ``max_epochs``.
        work_dir: app, studies and server log (recreated).
        venv: the MONAI Label virtual environment (``scripts/monailabel_env.sh``).
        timeout: seconds the training request may take.

    Returns:
        the row: ``round_s`` (the request's wall time), ``model_pt_mb``, ``models_mb`` (all files in ``models/``),
        ``files_mb``, ``model_changed``, ``labelled_studies`` (MONAI Label splits them by ``val_split`` into
        training and validation) and the settings.
    """
    app = Path(server.build_app(str(work_dir), bundle, cpu_demo=widths == "cpu_demo",
                                random_weights_if_missing=True, venv=venv, weights_dir=None))
    studies = Path(server.studies(str(work_dir), **STUDIES[bundle]))
    models = app / "model" / bundle / "models"
    before = _digest(models / "model.pt")
    info = server.start(str(app), str(studies), bundle, port=server.free_port(), work_dir=str(work_dir), venv=venv)
    try:
        request = urllib.request.Request(
            f"{info['url']}/train/{bundle}?run_sync=true", method="POST",
            data=json.dumps({"max_epochs": max_epochs, "device": "cpu", "val_split": 0.5,
                             "multi_gpu": False}).encode(),
            headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
        seconds = time.perf_counter() - start
    finally:
        server.stop_pid(info["pid"])
    files = _files_mb(models)
    return {"bundle": bundle, "widths": widths, "max_epochs": max_epochs,
            "labelled_studies": len(list((studies / "labels" / "final").glob("*.nii.gz"))),
            "round_s": seconds, "model_pt_mb": files.get("model.pt", 0.0), "models_mb": sum(files.values()),
            "files_mb": files, "model_changed": _digest(models / "model.pt") != before, "status": "ok"}


def monailabel(
    bundles: Sequence[str] = ("ceds_mediastinum", "cdugjl_liver"),
    widths: str = "paper",
    max_epochs: int = 1,
    venv: str = str(server.DEFAULT_VENV),
    work_dir: str = str(DEFAULT_WORK_DIR),
    out_dir: str = DEFAULT_OUT_DIR,
    tag: str = "",
) -> str:
    """Time one MONAI Label training round of each bundle and record what it writes.

    Args:
        bundles: bundles to train, one server each, one after the other.
        widths: "paper" (default widths) or "cpu_demo".
        max_epochs: epochs of the round (the README's example asks for 1).
        venv: the MONAI Label virtual environment.
        work_dir: where each bundle's app, studies and server log go (``<work_dir>/<bundle>``).
        out_dir: folder of the result JSON.
        tag: suffix of the result file name.

    Returns:
        the path of ``<out_dir>/monailabel[_<tag>].json``.
    """
    env = environment()
    rows = [training_round(b, widths, max_epochs, Path(work_dir) / b, venv) for b in bundles]
    settings = {"widths": widths, "max_epochs": max_epochs, "studies": {b: STUDIES[b] for b in bundles},
                "request": {"device": "cpu", "val_split": 0.5, "multi_gpu": False}}
    return write_and_print("monailabel", rows, settings, out_dir, tag, env, "MONAI Label training round",
                           ("bundle", "widths", "labelled_studies", "round_s", "model_pt_mb", "models_mb",
                            "model_changed"))
