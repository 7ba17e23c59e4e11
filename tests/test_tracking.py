"""Experiment tracking of a short training: MLflow (``--tracking mlflow``) and the bundles' TensorBoard handlers.

One 1-epoch training (validation included) per bundle (the liver student after a 1-epoch teacher),
``python -m monai.bundle run`` on a copy of the bundle with ``['train.json', 'cpu_demo.json']`` from a working
directory outside it, and ``--tracking mlflow`` when MLflow is installed. MONAI's default MLflow settings log
``train_loss`` through ``from_engine(['loss'], first=True)``, which needs the trainer's decollated output (a list
of dicts; ``"decollate": false`` gives a 1-tuple and MLflow fails on ``float(tuple)``).

MONAI 1.6.1's ``MLFlowHandler`` rejects a file-store ``tracking_uri`` (``file://.../mlruns``: "MLflow no longer
supports the filesystem (file store) tracking backend"), so the run is tracked in a local SQLite store,
``--tracking_uri sqlite:///<tmp>/mlruns.db``; artifacts then go to ``<tmp>/mlruns``.

``output_dir`` is left at its default (``<bundle_root>/eval``): overriding it with a plain path makes MONAI's
tracking patch build ``save_execute_config`` as ``"<path> + '/config_<time>.json'"`` (not an expression), and the
executed config is then silently not logged as an artifact.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest

from conftest import BUNDLES, run_cmd

DATA = {"ceds_mediastinum": "ct_data", "cdugjl_liver": "liver_data"}
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
EXPERIMENT = "tracking_test"
# configs trained first, untracked (one epoch): the liver student distils from models/teacher/model.pt
# (train.json + train_teacher.json)
PREREQUISITES = {"cdugjl_liver": [["train.json", "train_teacher.json"]]}


@pytest.fixture(scope="module", params=sorted(DATA))
def tracked_training(request, tmp_path_factory) -> dict:
    """Train a copy of the bundle for one epoch; returns its paths and the MLflow tracking URI (or None)."""
    name = request.param
    data = request.getfixturevalue(DATA[name])
    work = tmp_path_factory.mktemp(f"tracking_{name}")
    bundle = work / name
    shutil.copytree(BUNDLES / name, bundle, ignore=shutil.ignore_patterns("__pycache__", "eval", "models"))
    overrides = ["--bundle_root", str(bundle), "--dataset_dir", str(data), "--datalist",
                 str(data / "datalist_20.json"), "--epochs", "1", "--val_interval", "1"]
    for config in PREREQUISITES.get(name, []):
        configs = repr([str(bundle / "configs" / c) for c in (*config, "cpu_demo.json")])
        run_cmd([sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, *overrides,
                 "--output_dir", str(work / "prerequisites")], cwd=work, timeout=300, env={"OMP_NUM_THREADS": "2"})

    configs = repr([str(bundle / "configs" / c) for c in ("train.json", "cpu_demo.json")])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, *overrides]
    uri = f"sqlite:///{work / 'mlruns.db'}" if HAS_MLFLOW else None
    if uri:
        cmd += ["--tracking", "mlflow", "--tracking_uri", uri, "--experiment_name", EXPERIMENT]
    run_cmd(cmd, cwd=work, timeout=300, env={"OMP_NUM_THREADS": "2", "MLFLOW_DISABLE_TELEMETRY": "true"})
    return {"name": name, "bundle": bundle, "work": work, "uri": uri}


@pytest.mark.integration
@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install mlflow)")
def test_mlflow_run_with_metrics(tracked_training):
    """The MLflow store holds one finished run with the training loss, the validation Dice and the run's config."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked_training["uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert {"train_loss", "val_mean_dice"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 1
    assert int(run.data.params["max_epochs"]) == 1
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts), artifacts
    assert run.info.artifact_uri.startswith(tracked_training["work"].as_uri()), "artifacts must stay next to the db"


@pytest.mark.integration
def test_tensorboard_event_files(tracked_training):
    """The bundle's TensorBoard handlers write a training loss and the validation Dice to ``<output_dir>``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((tracked_training["bundle"] / "eval").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file in <bundle_root>/eval"
    tags: set[str] = set()
    for path in files:
        events = EventAccumulator(str(path))
        events.Reload()
        tags.update(events.Tags()["scalars"])
    assert any("loss" in tag for tag in tags), tags
    assert "val_mean_dice" in tags, tags
