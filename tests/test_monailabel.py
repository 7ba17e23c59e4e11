"""Both bundles served by a real MONAI Label 0.8.5 server (``scripts/monailabel_env.sh``, ``monailabel_server.py``).

The module builds (or reuses) the separate MONAI Label venv, copies both bundles into a ``monaibundle`` app with the
``cpu_demo`` overlay merged and random weights, writes phantom studies (CT labelled, liver as 4-D T2WI+DWI NIfTI
unlabelled), starts ``monailabel start_server`` on 127.0.0.1 and talks to it over HTTP only: inference with each
bundle (label shape and affine must match the study), then one training epoch per bundle (a new or rewritten
checkpoint must appear in the copied bundle's ``models/``); for the liver bundle the labels are first submitted
through ``PUT /datastore/label`` (and the CT labels removed) as an annotator would. The server is stopped by its
process group at the end. The first run installs the venv (about 5 min); later runs take about 1-2 min.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, build_monailabel_env
from monailabel_http import multipart, request

pytestmark = pytest.mark.integration

MODELS = {"ceds_mediastinum": "ct_000", "cdugjl_liver": "liver_000"}


@pytest.fixture(scope="module")
def server(monailabel_venv, tmp_path_factory):
    """A running MONAI Label server with both bundles; yields ``{"url", "pid", "log", "app", "work"}``."""
    import monailabel_server as helper

    work = tmp_path_factory.mktemp("monailabel")
    app = helper.build_app(str(work), cpu_demo=True, random_weights_if_missing=True, venv=str(monailabel_venv))
    studies = helper.studies(str(work), n_ct=2, n_liver=2, labelled="ct")
    info = helper.start(app, studies, port=helper.free_port(), work_dir=str(work), venv=str(monailabel_venv))
    try:
        yield {**info, "app": Path(app), "work": work}
    finally:
        helper.stop_pid(info["pid"])
        assert not helper._alive(info["pid"]), f"MONAI Label server {info['pid']} still running"


def _checkpoints(bundle: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (bundle / "models").glob("*.pt")}


def _train(server: dict, model: str) -> None:
    """One epoch through ``POST /train/<model>?run_sync=true``; the served ``models/model.pt`` must be rewritten (it is
    the model a training run ends with, in both bundles)."""
    bundle = server["app"] / "model" / model
    before = _checkpoints(bundle)
    params = {"max_epochs": 1, "device": "cpu", "val_split": 0.5, "multi_gpu": False, "pretrained": True}
    request(server, "POST", f"/train/{model}?run_sync=true", json.dumps(params).encode(), "application/json")
    after = _checkpoints(bundle)
    changed = [name for name, mtime in after.items() if before.get(name) != mtime]
    assert "model.pt" in changed, (f"models/model.pt not rewritten in {bundle / 'models'}: "
                                   f"before {before}, after {after}")


def test_env_is_idempotent(monailabel_venv):
    start = time.monotonic()
    proc = build_monailabel_env()
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout and time.monotonic() - start < 30
    assert not list((REPO / ".venv").glob("lib/python*/site-packages/torchvision_cpu_compat*")), "shim in main venv"


def test_info_lists_both_bundles(server):
    info = json.loads(request(server, "GET", "/info/"))
    for model in MODELS:
        assert info["models"][model]["type"] == "segmentation"
        assert list(info["models"][model]["labels"].values()) == [1]
        assert model in info["trainers"]


@pytest.mark.parametrize("model", list(MODELS))
def test_infer_returns_label_on_study_grid(server, model):
    image_id = MODELS[model]
    body, content_type = multipart({"params": json.dumps({"device": "cpu"})})
    result = request(server, "POST", f"/infer/{model}?image={image_id}&output=image", body, content_type)
    out = server["work"] / f"{model}_{image_id}_label.nii.gz"
    out.write_bytes(result)
    label, image = nib.load(out), nib.load(server["work"] / "studies" / f"{image_id}.nii.gz")
    assert label.shape == image.shape[:3]  # liver studies are [x, y, z, 2]: the label is [x, y, z]
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}


def test_train_ceds_one_epoch(server):
    _train(server, "ceds_mediastinum")


def test_train_liver_one_epoch_after_submitting_labels(server):
    for case in ("ct_000", "ct_001"):  # the datastore is shared: only liver studies may be labelled now
        request(server, "DELETE", f"/datastore/label?id={case}&tag=final")
    for case in ("liver_000", "liver_001"):
        label = server["work"] / "phantoms" / "liver" / "labelsTr" / f"{case}.nii.gz"
        body, content_type = multipart({}, {"label": label})
        request(server, "PUT", f"/datastore/label?image={case}&tag=final", body, content_type)
    # the local datastore drops a deleted label from its index when its file watcher sees the file go: poll
    deadline = time.monotonic() + 60
    while True:
        datastore = json.loads(request(server, "GET", "/datastore/?output=all"))
        labelled = sorted(k for k, v in datastore["objects"].items() if "final" in v.get("labels", {}))
        if labelled == ["liver_000", "liver_001"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert labelled == ["liver_000", "liver_001"]
    _train(server, "cdugjl_liver")


def test_training_round_benchmark_times_a_round_and_sees_the_new_model(monailabel_venv, tmp_path):
    """``benchmark_speed.py monailabel`` (the command behind the model cards' round time and size) runs a round
    on a server of its own, records it, and stops that server."""
    from conftest import run_cmd

    out, work = tmp_path / "results", tmp_path / "work"
    run_cmd([sys.executable, str(REPO / "scripts" / "benchmark_speed.py"), "monailabel", "--bundles",
             "['ceds_mediastinum']", "--widths", "cpu_demo", "--venv", str(monailabel_venv), "--work_dir", str(work),
             "--out_dir", str(out)], cwd=tmp_path, timeout=1200)
    result = json.loads((out / "monailabel.json").read_text())
    (row,) = result["rows"]
    assert row["bundle"] == "ceds_mediastinum" and row["widths"] == "cpu_demo" and row["labelled_studies"] == 2
    assert row["model_changed"] and row["round_s"] > 0
    assert 0 < row["model_pt_mb"] <= row["models_mb"] == pytest.approx(sum(row["files_mb"].values()))
    server_record = work / "ceds_mediastinum" / "server.json"
    pid = json.loads(server_record.read_text())["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
