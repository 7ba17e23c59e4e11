"""The liver bundle as a bundle: metadata, config properties, network I/O, and short CLI runs on phantoms."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, bundle_module, meta_schema, run_cmd

BUNDLE = BUNDLES / "cdugjl_liver"
CONFIGS = BUNDLE / "configs"
DEMO = str(CONFIGS / "cpu_demo.json")

CHECK_PROPERTIES = """
import json, sys
from monai.bundle import ConfigWorkflow
cases, meta, bundle_root, dataset_dir, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
result = {}
for files, workflow_type in cases:
    wf = ConfigWorkflow(config_file=files, meta_file=meta, logging_file=False, workflow_type=workflow_type,
                        bundle_root=bundle_root, dataset_dir=dataset_dir, cache_rate=0.0, output_dir=out, ckpt_dir=out)
    wf.initialize()
    result["+".join(f.rsplit("/", 1)[-1] for f in files)] = wf.check_properties()
    wf.finalize()
print("RESULT" + json.dumps(result))
"""


def bundle_run(config_files: list[str], cwd, *overrides: str, timeout: float = 600):
    """``python -m monai.bundle run`` on the given config files, from ``cwd`` (outside the bundle)."""
    files = "[" + ",".join(f"'{f}'" for f in config_files) + "]"
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(BUNDLE)]
    return run_cmd(args + list(overrides), cwd=cwd, timeout=timeout)


def test_metadata_valid():
    jsonschema = pytest.importorskip("jsonschema")
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    jsonschema.validate(meta, json.loads(meta_schema().read_text()))
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "liver tumor"}
    assert meta["monai_version"] == "1.6.1" and "required_packages_version" in meta


def test_inference_config_is_standalone():
    text = (CONFIGS / "inference.json").read_text()
    assert "@_meta_" not in text and "_meta_#" not in text
    assert json.loads(text)["initialize"][:2] == ["$import sys", "$sys.path.insert(0, @bundle_root)"]


CONFIG_CASES = [
    (["train.json", "train_teacher.json"], "train"),
    (["train.json"], "train"),
    (["train.json", "cpu_demo.json"], "train"),
    (["train.json", "evaluate.json"], "train"),
    (["train.json", "train_teacher.json", "evaluate.json"], "train"),
    (["train.json", "multi_gpu_train.json"], "train"),
    (["inference.json"], "infer"),
]


def test_check_properties(tmp_path, liver_data):
    """``check_properties() == []`` for every config combination, in one fresh process started outside the bundle."""
    cases = [([str(CONFIGS / f) for f in files], kind) for files, kind in CONFIG_CASES]
    # multi_gpu_train.json's initialize joins a (one-process, gloo) process group
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    args = [sys.executable, "-c", CHECK_PROPERTIES, json.dumps(cases), str(CONFIGS / "metadata.json"), str(BUNDLE),
            str(liver_data), str(tmp_path)]
    proc = run_cmd(args, cwd=tmp_path, timeout=600, env=env)
    result = json.loads(proc.stdout.split("RESULT")[-1])
    assert result == {k: [] for k in result} and len(result) == len(CONFIG_CASES), result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_verify_net_in_out(tmp_path):
    args = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def"]
    args += ["--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.json")]
    args += ["--bundle_root", str(BUNDLE), "--n", "4", "--device", "cpu"]
    run_cmd(args, cwd=tmp_path, timeout=300, env={"PYTHONPATH": str(BUNDLE)})


SSL_TERMS = ("attention", "feature", "contrast", "distill_kl", "consistency", "seg", "quant", "edge")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, liver_data):
    """A 1-epoch teacher, then a 1-epoch semi-supervised student with every term on (20 % labelled datalist)."""
    work = tmp_path_factory.mktemp("liver_bundle")
    common = ["--dataset_dir", str(liver_data), "--ckpt_dir", str(work / "models"), "--output_dir", str(work / "eval")]
    common += ["--epochs", "1", "--val_interval", "1", "--num_samples", "2"]
    bundle_run([str(CONFIGS / "train.json"), str(CONFIGS / "train_teacher.json"), DEMO], work, *common)
    proc = bundle_run(
        [str(CONFIGS / "train.json"), DEMO], work, *common, "--datalist", str(liver_data / "datalist_20.json"),
        "--grad_share_interval", "1", "--teacher_min_dice", "0.0",  # the check reads the teacher's metrics.csv
    )
    (work / "student.log").write_text(proc.stdout + proc.stderr)
    return work


@pytest.mark.integration
def test_teacher_and_student_checkpoints(trained):
    nets = bundle_module("cdugjl_liver", "networks")
    demo = json.loads(open(DEMO).read())
    # the same files in models/ (student) and models/teacher/: the final network, the best on validation, the state
    for name, in_channels in (("teacher/model.pt", 3), ("teacher/model_best.pt", 3), ("model.pt", 2),
                              ("model_best.pt", 2)):
        state = torch.load(trained / "models" / name, map_location="cpu", weights_only=True)
        assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
        nets.MEAMTNet(in_channels=in_channels, channels=demo["channels"]).load_state_dict(state)
    # the teacher's last validation, which a student's teacher_min_dice check reads (MetricsSaver)
    dice = bundle_module("cdugjl_liver", "distillation").recorded_dice(trained / "models" / "teacher")
    assert dice is not None and 0.0 <= dice <= 1.0
    assert "teacher validation Dice" in (trained / "student.log").read_text()
    checkpoint = torch.load(trained / "models" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert {"model", "heads", "ema", "optimizer", "lr_scheduler"} <= set(checkpoint)
    # model.pt is the network the run ended with
    for key, value in torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True).items():
        assert torch.equal(value, checkpoint["model"][key]), key
    assert (trained / "models" / "teacher" / "checkpoint.pt").is_file()


@pytest.mark.integration
def test_student_used_every_term(trained):
    log = (trained / "student.log").read_text()
    assert "loaded the frozen teacher" in log
    logged = [line for line in log.splitlines() if " loss: " in line]
    assert logged and all(f" loss_{term}: " in logged[-1] for term in SSL_TERMS), logged[-1:]
    # each distillation and consistency term's share of the student's gradient is logged; the distillation terms
    # act from the first iteration (the consistency's ramped weight is still about 1e-3 in this one-iteration run)
    shares = {t: float(logged[-1].split(f" grad_share_{t}: ")[1].split()[0])
              for t in ("attention", "feature", "contrast", "distill_kl", "consistency")}
    assert all(shares[t] > 0.0 for t in ("attention", "feature", "contrast", "distill_kl")), shares


@pytest.mark.integration
def test_evaluate_writes_metrics(trained, liver_data):
    out = trained / "evaluation"
    bundle_run(
        [str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json"), DEMO],
        trained,
        "--dataset_dir", str(liver_data), "--ckpt_dir", str(trained / "models"), "--output_dir", str(out),
    )
    header, *rows = (out / "metrics.csv").read_text().splitlines()
    names = {r.split(",")[0] for r in [header, *rows]}
    assert {"test_mean_dice", "test_hd95_mm", "test_asd_mm", "test_centre_mae_mm", "test_area_mae_mm2"} <= names
    assert {"test_x_mae_mm", "test_y_mae_mm", "test_ece", "test_ece_foreground", "test_uncertainty_auroc",
            "test_uncertainty_auroc_foreground"} <= names
    ece = float((out / "test_ece_raw.csv").read_text().splitlines()[1].split(",")[-1])
    assert 0.0 <= ece <= 1.0
    test_cases = {r["case"] for r in json.loads((liver_data / "datalist_100.json").read_text())["test"]}
    raw = (out / "test_mean_dice_raw.csv").read_text().splitlines()[1:]
    assert {line.split(",")[0] for line in raw} == test_cases
    table_header, *table = (out / "per_case.csv").read_text().splitlines()
    assert table_header.split(",")[0] == "case" and "test_uncertainty_auroc" in table_header.split(",")
    assert {row.split(",")[0] for row in table} == test_cases


@pytest.mark.integration
def test_inference_outputs_in_input_geometry(trained, liver_data):
    record = json.loads((liver_data / "datalist_100.json").read_text())["test"][0]
    images = [str(liver_data / p) for p in record["image"]]
    # the same case as one 4D NIfTI (channels last), the form MONAI Label passes (one file per image)
    stacked = trained / "stacked" / "case4d.nii.gz"
    stacked.parent.mkdir(exist_ok=True)
    volumes = [nib.load(p) for p in images]
    channels_last = np.stack([v.get_fdata() for v in volumes], -1).astype(np.float32)
    nib.save(nib.Nifti1Image(channels_last, volumes[0].affine), stacked)
    out = trained / "inference"
    bundle_run(
        [str(CONFIGS / "inference.json"), DEMO],
        trained,
        "--data", json.dumps([{"image": images}, {"image": str(stacked)}]),
        "--checkpoint", str(trained / "models" / "model.pt"),
        "--output_dir", str(out),
    )
    case = record["case"]
    reference = nib.load(images[0])
    for postfix in ("seg", "uncertainty"):
        written = nib.load(out / case / f"{case}_{postfix}.nii.gz")
        assert written.shape == reference.shape
        np.testing.assert_allclose(written.affine, reference.affine, atol=1e-4)
    seg = np.asarray(nib.load(out / case / f"{case}_seg.nii.gz").dataobj)
    seg4d = nib.load(out / "case4d" / "case4d_seg.nii.gz")
    assert seg4d.shape == reference.shape and np.array_equal(np.asarray(seg4d.dataobj), seg)
    assert set(np.unique(seg)) <= {0, 1}
    uncertainty = np.asarray(nib.load(out / case / f"{case}_uncertainty.nii.gz").dataobj)
    assert uncertainty.min() > 0 and uncertainty.max() <= 1 + 1e-5  # K / S with S >= K

    report = json.loads((out / case / f"{case}_quantification.json").read_text())
    assert report["case"] == case
    assert report["units"]["area"] == "mm^2"
    spacing = report["geometry"]["spacing"]
    assert spacing[0] == pytest.approx(json.loads(open(DEMO).read())["pixdim"][0], rel=1e-3)
    assert spacing[2] == pytest.approx(float(reference.header.get_zooms()[2]), rel=1e-3)  # slices never resampled
    assert report["geometry"]["shape"][2] == reference.shape[2]
    for entry in report["slices"]:
        net = entry["network"]
        assert np.isfinite(net["area_mm2"]) and net["area_epistemic_std_mm2"] > 0
        assert len(net["centre_world_mm"]) == 3


@pytest.mark.integration
def test_missing_teacher_is_a_clear_error(tmp_path, liver_data):
    files = f"['{CONFIGS / 'train.json'}','{DEMO}']"
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(BUNDLE),
            "--dataset_dir", str(liver_data), "--datalist", str(liver_data / "datalist_20.json"),
            "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"), "--epochs", "1"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "teacher checkpoint not found" in proc.stdout + proc.stderr


@pytest.mark.integration
def test_monai_label_style_training_without_teacher(tmp_path, liver_data):
    """MONAI Label overrides the labelled/validation records with {"image", "label"} only (no CE phases, no organs)
    and the datalist path does not exist: no teacher is needed, no unlabelled stream, training still runs."""
    datalist = json.loads((liver_data / "datalist_100.json").read_text())
    records = [{"image": [str(liver_data / p) for p in r["image"]], "label": str(liver_data / r["label"])}
               for r in datalist["training"][:2]]
    bundle_run(
        [str(CONFIGS / "train.json"), DEMO], tmp_path,
        "--train#dataset#data", json.dumps(records), "--validate#dataset#data", json.dumps(records[:1]),
        "--dataset_dir", str(tmp_path / "absent"), "--ckpt_dir", str(tmp_path / "models"),
        "--output_dir", str(tmp_path / "eval"), "--epochs", "1", "--val_interval", "1", "--num_samples", "2",
        "--device", "cpu",
    )
    assert (tmp_path / "models" / "model.pt").is_file()


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.integration
def test_multi_gpu_config_two_cpu_processes_with_teacher(trained, liver_data, tmp_path):
    """``multi_gpu_train.json`` with every term on: two gloo processes, the student's distillation heads in the one
    DDP module, one model.pt."""
    ckpt_dir = tmp_path / "models"
    ckpt_dir.mkdir()
    (ckpt_dir / "teacher").mkdir()
    shutil.copy(trained / "models" / "teacher" / "model.pt", ckpt_dir / "teacher" / "model.pt")
    files = repr([str(CONFIGS / c) for c in ("train.json", "multi_gpu_train.json", "cpu_demo.json")])
    proc = run_cmd(
        [*_torchrun(), "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "monai.bundle", "run",
         "--config_file", files, "--bundle_root", str(BUNDLE), "--dataset_dir", str(liver_data),
         "--datalist", str(liver_data / "datalist_20.json"), "--ckpt_dir", str(ckpt_dir),
         "--output_dir", str(tmp_path / "eval"), "--epochs", "1", "--val_interval", "1", "--num_samples", "2"],
        cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"},
    )
    log = proc.stdout + proc.stderr
    assert log.count("Epoch[1] Complete") >= 2 and log.count("loaded the frozen teacher") == 2
    state = torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)
    assert state and not any(k.startswith("module.") for k in state)
    checkpoint = torch.load(ckpt_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in checkpoint["model"]) and checkpoint["heads"]
    assert not any(k.startswith("module.") for k in checkpoint["heads"])
