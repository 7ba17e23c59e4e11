"""Bundle-level tests of ``ceds_mediastinum``: metadata, config properties, and short real runs of every config.

Every bundle command runs in a fresh subprocess from a working directory outside the bundle (``tmp_path``), with
checkpoints and outputs written to ``tmp_path`` so the repository stays clean.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLES, meta_schema, run_cmd

BUNDLE = BUNDLES / "ceds_mediastinum"
CONFIGS = BUNDLE / "configs"
# tiny widths and patches on top of cpu_demo.json; three epochs of one iteration (one labelled case) run the three
# phases: warm-up (the first third of the run), semi-supervised, then confidence re-training (the window of a third of
# the run that starts every two thirds)
TINY = ["--channels", "[4,8,16,32,64]", "--roi_size", "[32,32,32]", "--sw_batch_size", "2"]
SCHEDULE = ["--warmup", str(1 / 3), "--confidence_interval", str(2 / 3), "--confidence_length", str(1 / 3),
            "--val_interval", "3"]


def data_args(ct_data: Path) -> list[str]:
    """Overrides pointing the bundle at the phantom dataset and its 20 % labelled datalist."""
    return ["--dataset_dir", str(ct_data), "--datalist", str(ct_data / "datalist_20.json")]


def bundle_run(configs: list[str], cwd: Path, *overrides: str, torchrun: int = 0, timeout: float = 600):
    """``python -m monai.bundle run`` (or under ``torchrun``) with ``configs`` + ``cpu_demo.json``, from ``cwd``."""
    files = repr([str(CONFIGS / c) for c in (*configs, "cpu_demo.json")])
    launcher = [sys.executable, "-m", "monai.bundle"]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                    f"--nproc_per_node={torchrun}", "-m", "monai.bundle"]
    cmd = [*launcher, "run", "--config_file", files, "--bundle_root", str(BUNDLE), *TINY, *overrides]
    return run_cmd(cmd, cwd=cwd, timeout=timeout, env={"OMP_NUM_THREADS": "2"})


def test_metadata_schema():
    jsonschema = pytest.importorskip("jsonschema")
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    jsonschema.validate(meta, json.loads(meta_schema().read_text()))
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "mediastinal tumor"} and pred["num_channels"] == 2
    assert meta["monai_version"] == "1.6.1" and meta["pytorch_version"] == "2.13.0"
    assert meta["version"] in meta["changelog"]


def test_configs_reference_top_level_hyperparameters():
    """cpu_demo.json only overrides top-level keys, and every config reads them."""
    demo = json.loads((CONFIGS / "cpu_demo.json").read_text())
    assert all("#" not in k and "::" not in k for k in demo)
    train = json.loads((CONFIGS / "train.json").read_text())
    infer = json.loads((CONFIGS / "inference.json").read_text())
    for key in ("channels", "roi_size", "pixdim", "sw_batch_size"):
        assert key in train and key in infer
    assert isinstance(train["train"]["handlers"], list)
    assert train["train"]["dataset"]["data"]["split"] == "training"
    assert train["train"]["unlabeled"]["records"]["split"] == "unlabeled"
    # the unlabelled stream never reads a label
    assert "label" not in json.dumps(train["train"]["unlabeled"]["deterministic_transforms"])
    assert "label" not in json.dumps(train["train"]["unlabeled"]["random_transforms"])
    assert "@_meta_" not in (CONFIGS / "inference.json").read_text()


@pytest.mark.integration
def test_check_properties(tmp_path, ct_data):
    """``check_properties() == []`` for train, train+evaluate, inference and the multi-GPU overlays (gloo, 1 rank)."""
    script = textwrap.dedent(
        f"""
        import json
        from monai.bundle import ConfigWorkflow
        configs = {str(CONFIGS)!r}
        cases = [(["train.json"], "train"), (["train.json", "evaluate.json"], "train"), (["inference.json"], "infer"),
                 (["train.json", "multi_gpu_train.json"], "train"),
                 (["train.json", "evaluate.json", "multi_gpu_evaluate.json"], "train")]
        result = {{}}
        for files, kind in cases:
            wf = ConfigWorkflow(config_file=[configs + "/" + f for f in files], meta_file=configs + "/metadata.json",
                                logging_file=configs + "/logging.conf", workflow_type=kind,
                                bundle_root={str(BUNDLE)!r}, dataset_dir={str(ct_data)!r}, cache_rate=0.0,
                                num_workers=0, load_pretrain=False, channels=[4, 8, 16, 32, 64],
                                ckpt_dir={str(tmp_path / "models")!r}, output_dir={str(tmp_path / "eval")!r})
            wf.initialize()
            result["+".join(files)] = wf.check_properties()
            wf.finalize()
        print("RESULT" + json.dumps(result))
        """
    )
    with socket.socket() as s:  # a free port for the single-rank process group of the multi-GPU overlays
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = run_cmd([sys.executable, "-c", script], cwd=tmp_path, timeout=300, env=env)
    result = json.loads(proc.stdout.split("RESULT")[-1])
    assert result == {k: [] for k in result} and len(result) == 5, result


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ct_data):
    """A 3-epoch CEDS training (warm-up, semi-supervised, confidence re-training) on the 20 % datalist."""
    out = tmp_path_factory.mktemp("ceds_train")
    proc = bundle_run(["train.json"], out, *data_args(ct_data), "--ckpt_dir", str(out / "models"),
                      "--output_dir", str(out / "train"), "--epochs", "3", *SCHEDULE, "--grad_share_interval", "1")
    return out, proc.stdout + proc.stderr


@pytest.mark.integration
def test_train_writes_checkpoints_and_metrics(trained):
    out, log = trained
    models = out / "models"
    assert {"model.pt", "model_best.pt", "checkpoint.pt"} <= {p.name for p in models.iterdir()}
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert "encoder.in_tr.conv_block.conv.weight" in state and "confidence_out.conv2.weight" in state  # a state_dict
    ckpt = torch.load(models / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "ema", "optimizer", "lr_scheduler", "trainer"}  # the liver bundle's keys
    assert ckpt["trainer"]["iteration"] == 3 * ckpt["trainer"]["epoch_length"]  # ignite stores iterations
    metrics = (out / "train" / "validation" / "metrics.csv").read_text()
    assert metrics.startswith("val_mean_dice")
    assert list((out / "train").glob("events.out.tfevents.*"))
    # all three phases ran: supervised (seg + confidence), semi-supervised (consistency weight > 0), re-training
    # (semi-supervised + confidence)
    lines = [ln for ln in log.splitlines() if "Epoch: " in ln and "Iter:" in ln]
    assert any("Epoch: 1/3" in ln and "loss_seg: 0.0000" not in ln for ln in lines)
    assert any("Epoch: 2/3" in ln and "consistency_weight: 0.0000" not in ln for ln in lines)
    assert any("Epoch: 3/3" in ln and "loss_seg: 0.0000" not in ln and "loss_confidence: 0.0000" not in ln
               and "consistency_weight: 0.0000" not in ln for ln in lines)  # re-training: segmentation goes on
    # the consistency's share of the student's gradient is logged, and it acts once its weight ramps up
    shares = [float(ln.split("grad_share_consistency: ")[1].split()[0])
              for ln in lines if "grad_share_consistency" in ln]
    assert shares and max(shares) > 0.0


@pytest.mark.integration
def test_resume(trained, ct_data):
    out, _ = trained
    proc = bundle_run(["train.json"], out, *data_args(ct_data), "--ckpt_dir", str(out / "models"),
                      "--output_dir", str(out / "train"), "--epochs", "4", *SCHEDULE, "--resume", "True",
                      "--device", "cpu")  # a string device, as MONAI Label passes it
    log = proc.stdout + proc.stderr
    assert "Restored all variables from" in log
    assert "Epoch: 4/4" in log and "Epoch: 1/4" not in log
    ckpt = torch.load(out / "models" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 4 * ckpt["trainer"]["epoch_length"]


@pytest.mark.integration
def test_evaluate(trained, ct_data):
    out, _ = trained
    bundle_run(["train.json", "evaluate.json"], out, *data_args(ct_data), "--ckpt_dir", str(out / "models"),
               "--output_dir", str(out / "evaluate"))
    test_cases = json.loads((ct_data / "datalist_20.json").read_text())["test"]
    for metric in ("test_mean_dice", "test_hd95_mm", "test_asd_mm"):  # the liver bundle's names
        rows = (out / "evaluate" / f"{metric}_raw.csv").read_text().strip().splitlines()
        assert len(rows) == 1 + len(test_cases)
        assert sorted(Path(r.split(",")[0]).name for r in rows[1:]) == sorted(Path(c["image"]).name for c in test_cases)
        assert (out / "evaluate" / f"{metric}_summary.csv").exists()
    summary = dict(line.split("\t") if "\t" in line else line.split(",")
                   for line in (out / "evaluate" / "metrics.csv").read_text().splitlines())
    assert set(summary) == {"test_mean_dice", "test_hd95_mm", "test_asd_mm"}
    assert 0.0 <= float(summary["test_mean_dice"]) <= 1.0


@pytest.mark.integration
def test_inference_geometry(trained, ct_data, tmp_path):
    nib = pytest.importorskip("nibabel")
    out, _ = trained
    case = json.loads((ct_data / "datalist_20.json").read_text())["test"][0]
    image = ct_data / case["image"]
    bundle_run(["inference.json"], tmp_path, "--data", repr([{"image": str(image)}]),
               "--ckpt_dir", str(out / "models"), "--output_dir", str(tmp_path / "inference"), "--device", "cpu")
    name = image.name.replace(".nii.gz", "")
    src = nib.load(str(image))
    seg = nib.load(str(tmp_path / "inference" / name / f"{name}_seg.nii.gz"))
    conf = nib.load(str(tmp_path / "inference" / name / f"{name}_confidence.nii.gz"))
    for result in (seg, conf):
        assert result.shape == src.shape
        np.testing.assert_allclose(result.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
    values = np.asarray(conf.dataobj)
    assert values.dtype == np.float32 and values.min() >= 0.0 and values.max() <= 1.0


@pytest.mark.integration
def test_verify_net_in_out_and_torchscript(trained, tmp_path):
    """``verify_net_in_out`` and ``ckpt_export`` (TorchScript) of the trained weights; they need PYTHONPATH."""
    out, _ = trained
    common = ["--meta_file", str(CONFIGS / "metadata.json"), "--bundle_root", str(BUNDLE),
              "--config_file", repr([str(CONFIGS / "inference.json"), str(CONFIGS / "cpu_demo.json")])]
    env = {"PYTHONPATH": str(BUNDLE)}
    run_cmd([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", *common, "--n", "2"],
            cwd=tmp_path, timeout=300, env=env)
    run_cmd([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", *common,
             "--filepath", str(tmp_path / "model.ts"), "--ckpt_file", str(out / "models" / "model.pt")],
            cwd=tmp_path, timeout=300, env=env)
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.no_grad():
        assert scripted(torch.rand(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


@pytest.mark.integration
def test_multi_gpu_train_gloo(tmp_path, ct_data):
    """``multi_gpu_train.json`` under torchrun with two CPU processes (gloo) writes exactly one ``model.pt``."""
    models = tmp_path / "models"
    bundle_run(["train.json", "multi_gpu_train.json"], tmp_path, *data_args(ct_data), "--ckpt_dir", str(models),
               "--output_dir", str(tmp_path / "train"), "--epochs", "1", "--warmup", "0", "--confidence_interval", "0",
               "--val_interval", "1", torchrun=2)
    assert sorted(p.name for p in models.glob("model*.pt")) == ["model.pt", "model_best.pt"]
    assert torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert os.path.exists(tmp_path / "train" / "validation" / "metrics.csv")
