"""Training faults and determinism of the bundles, through ``python -m monai.bundle run``.

- Resume (both bundles): a training killed with SIGKILL in the middle of an epoch resumes from its last periodic
  checkpoint (network, EMA teacher, optimisers, schedulers, the liver student's distillation heads, trainer state) and
  ends at the planned epoch count.
  The resumed run dumps, right after the checkpoint is restored (``Events.STARTED``), the state dicts of what it
  restored; they must equal the checkpoint exactly.
- Determinism (both bundles): the same seed on CPU (``num_workers`` 0) gives identical losses, validation metrics
  and weights twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BUNDLES, run_cmd

CEDS = BUNDLES / "ceds_mediastinum"
LIVER = BUNDLES / "cdugjl_liver"
# tiny network and patches on top of cpu_demo.json
CEDS_TINY = ["--channels", "[2,4,8,16,32]", "--roi_size", "[16,16,16]", "--sw_batch_size", "2"]
# schedules are fractions of the run: with 3 epochs of 8 iterations (24), no warm-up, confidence re-training (on top
# of the semi-supervised step) in the first 2 of every 8 iterations (a twelfth of the run every third)
RESUME_INTERVAL, RESUME_LENGTH = 1 / 3, 1 / 12
RESUME_SCHEDULE = ["--warmup", "0", "--confidence_interval", str(RESUME_INTERVAL),
                   "--confidence_length", str(RESUME_LENGTH)]
# one thread: on a shared CPU, OpenMP threads contending for cores slow tiny networks down many times over
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ITER_LINE = re.compile(r"Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+)")


def ceds_cmd(*overrides: str, extra_configs: tuple[str, ...] = ()) -> list[str]:
    """``python -m monai.bundle run`` of the CEDS train.json + cpu_demo.json (+ ``extra_configs``) with overrides."""
    files = [str(CEDS / "configs" / c) for c in ("train.json", "cpu_demo.json")] + list(extra_configs)
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files), "--bundle_root", str(CEDS),
            "--device", "cpu", "--num_workers", "0", *CEDS_TINY, *overrides]


def liver_cmd(*overrides: str, extra_configs: tuple[str, ...] = ()) -> list[str]:
    """``python -m monai.bundle run`` of the liver student's train.json + cpu_demo.json (+ ``extra_configs``) with a
    tiny network, EMA consistency on and distillation off (no teacher checkpoint needed), and ``overrides``."""
    files = [str(LIVER / "configs" / c) for c in ("train.json", "cpu_demo.json")] + list(extra_configs)
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files), "--bundle_root", str(LIVER),
            "--device", "cpu", "--num_samples", "2", "--num_workers", "0", "--channels", "[4,8,16,32,64]",
            "--roi_size", "[32,32]", "--attention_weight", "0", "--feature_weight", "0", "--contrast_weight", "0",
            "--distill_kl_weight", "0", *overrides]


def several_iterations_datalist(ct_data: Path, out: Path) -> Path:
    """A datalist with 8 labelled records (the 4 labelled cases twice: 8 iterations per epoch, so that the kill
    lands mid-epoch) and 3 unlabelled ones, absolute paths."""
    full = json.loads((ct_data / "datalist_100.json").read_text())
    part = json.loads((ct_data / "datalist_20.json").read_text())

    def absolute(records: list[dict]) -> list[dict]:
        return [{k: str(ct_data / v) for k, v in r.items() if k in ("image", "label")} for r in records]

    datalist = {"training": absolute(full["training"]) * 2, "unlabeled": absolute(part["unlabeled"]),
                "validation": absolute(part["validation"]), "test": absolute(part["test"])}
    path = out / "datalist_resume.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path


def restored_state_probe(out: Path, probe: Path, states: str) -> Path:
    """An overlay whose ``run`` first adds a ``STARTED`` handler (after the resume loader) that saves ``states``,
    an expression of the trainer ``e`` and config references, to ``probe``."""
    overlay = {"run": ["$import ignite",
                       f"$@train#trainer.add_event_handler(ignite.engine.Events.STARTED, "
                       f"lambda e: torch.save({states}, {str(probe)!r}))",
                       "$@train#trainer.run()"]}
    path = out / "probe.json"
    path.write_text(json.dumps(overlay, indent=1))
    return path


def assert_same(a, b, where: str = "") -> None:
    """Exact equality of nested state dicts (tensors compared with ``torch.equal``)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def kill_mid_epoch(cmd: list[str], cwd: Path, ckpt_dir: Path, log: Path, timeout: float = 240) -> int:
    """Start ``cmd`` in its own process group; SIGKILL it once an iteration of the epoch after a checkpoint ran.

    Returns:
        the epoch of the newest ``[<prefix>_]checkpoint_epoch=N.pt`` at the time of the kill.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(ENV)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"training ended before it was killed:\n{log.read_text()[-4000:]}"
            epochs = [int(p.stem.split("=")[1]) for p in ckpt_dir.glob("*checkpoint_epoch=*.pt")]
            if epochs:
                saved = max(epochs)
                running = [m for m in ITER_LINE.finditer(log.read_text()) if int(m.group(1)) == saved + 1]
                if running:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return saved
            time.sleep(0.02)
        pytest.fail(f"no checkpoint followed by an iteration in {timeout} s:\n{log.read_text()[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.integration
def test_ceds_resume_after_sigkill(tmp_path, ct_data):
    epochs = 3
    ckpt_dir = tmp_path / "models"
    datalist = several_iterations_datalist(ct_data, tmp_path)
    common = ["--dataset_dir", str(ct_data), "--datalist", str(datalist), "--ckpt_dir", str(ckpt_dir),
              "--output_dir", str(tmp_path / "train"), "--epochs", str(epochs), "--val_interval", "100",
              "--checkpoint_interval", "1", *RESUME_SCHEDULE]
    saved = kill_mid_epoch(ceds_cmd(*common), tmp_path, ckpt_dir, tmp_path / "killed.log")
    killed_log = (tmp_path / "killed.log").read_text()
    # the kill landed inside epoch saved + 1: some but not all of its iterations ran, and it was never saved
    last = [m for m in ITER_LINE.finditer(killed_log) if int(m.group(1)) == saved + 1]
    assert last and int(last[-1].group(3)) < int(last[-1].group(4)), killed_log[-3000:]
    assert not (ckpt_dir / "checkpoint.pt").exists() and not (ckpt_dir / f"checkpoint_epoch={saved + 1}.pt").exists()
    # keep the checkpoint: the resumed run replaces it (n_saved=1)
    resume_from = tmp_path / "resume_from.pt"
    resume_from.write_bytes((ckpt_dir / f"checkpoint_epoch={saved}.pt").read_bytes())

    probe = tmp_path / "restored.pt"
    states = ("{'model': e.network.state_dict(), 'ema': e.ema.state_dict(), "
              "'optimizer': e.optimizer.state_dict(), 'lr_scheduler': @lr_scheduler.state_dict(), "
              "'trainer': e.state_dict()}")
    overlay = restored_state_probe(tmp_path, probe, states)
    proc = run_cmd(ceds_cmd(*common, "--resume", "True", "--resume_checkpoint", str(resume_from),
                            extra_configs=(str(overlay),)), cwd=tmp_path, timeout=300, env=ENV)
    log = proc.stdout + proc.stderr
    assert f"Restored all variables from {resume_from}" in log
    logged_epochs = sorted({int(m.group(1)) for m in ITER_LINE.finditer(log)})
    assert logged_epochs == list(range(saved + 1, epochs + 1)), logged_epochs

    # what the resumed run restored equals the checkpoint: network, teacher, optimisers, schedulers, trainer
    ckpt = torch.load(resume_from, map_location="cpu", weights_only=True)
    restored = torch.load(probe, map_location="cpu", weights_only=True)
    assert set(ckpt) == set(restored) == {"model", "ema", "optimizer", "lr_scheduler", "trainer"}
    for key in ("model", "ema", "optimizer", "lr_scheduler"):
        assert_same(ckpt[key], restored[key], key)
    # ignite keeps the iteration count (epoch = iteration // epoch_length) and the current run's max_epochs
    assert_same(ckpt["trainer"], {**restored["trainer"], "max_epochs": ckpt["trainer"]["max_epochs"]}, "trainer")
    assert restored["trainer"]["iteration"] == saved * restored["trainer"]["epoch_length"]
    assert restored["trainer"]["max_epochs"] == epochs
    # an AveragedModel, updated in every iteration after the (empty) warm-up, re-training windows included
    assert int(ckpt["ema"]["n_averaged"]) == 8 * saved
    assert any(not torch.equal(ckpt["ema"]["module." + k], v) for k, v in ckpt["model"].items())  # a real EMA
    assert ckpt["optimizer"]["state"]

    final = torch.load(ckpt_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    length = final["trainer"]["epoch_length"]
    assert final["trainer"]["iteration"] == epochs * length and final["trainer"]["max_epochs"] == epochs
    # the learning-rate schedule continued from the checkpoint, one step per iteration
    total = epochs * length
    assert final["lr_scheduler"]["last_epoch"] == ckpt["lr_scheduler"]["last_epoch"] + total - saved * length


@pytest.mark.integration
def test_liver_resume_after_sigkill(tmp_path, liver_data):
    """The liver student (EMA consistency on), killed mid-epoch, resumes model, distillation heads, EMA, optimiser,
    scheduler and trainer state from its periodic checkpoint and ends at the planned epoch."""
    epochs, length = 3, 6
    ckpt_dir = tmp_path / "models"
    common = ["--dataset_dir", str(liver_data), "--datalist", str(liver_data / "datalist_20.json"),
              "--ckpt_dir", str(ckpt_dir), "--output_dir", str(tmp_path / "eval"), "--epochs", str(epochs),
              "--epoch_length", str(length), "--val_interval", "100", "--checkpoint_interval", "1"]
    saved = kill_mid_epoch(liver_cmd(*common), tmp_path, ckpt_dir, tmp_path / "killed.log")
    killed_log = (tmp_path / "killed.log").read_text()
    last = [m for m in ITER_LINE.finditer(killed_log) if int(m.group(1)) == saved + 1]
    assert last and int(last[-1].group(3)) < length, killed_log[-3000:]
    assert not (ckpt_dir / "checkpoint.pt").exists()
    resume_from = tmp_path / "resume_from.pt"
    resume_from.write_bytes((ckpt_dir / f"checkpoint_epoch={saved}.pt").read_bytes())

    probe = tmp_path / "restored.pt"
    states = ("{'model': @network.state_dict(), 'heads': @student_def.heads.state_dict(), "
              "'ema': @ema_network.state_dict(), "
              "'optimizer': @optimizer.state_dict(), 'lr_scheduler': @lr_scheduler.state_dict(), "
              "'trainer': e.state_dict()}")
    overlay = restored_state_probe(tmp_path, probe, states)
    proc = run_cmd(liver_cmd(*common, "--resume", "True", "--resume_checkpoint", str(resume_from),
                             extra_configs=(str(overlay),)), cwd=tmp_path, timeout=300, env=ENV)
    log = proc.stdout + proc.stderr
    assert f"Restored all variables from {resume_from}" in log
    assert sorted({int(m.group(1)) for m in ITER_LINE.finditer(log)}) == list(range(saved + 1, epochs + 1))

    ckpt = torch.load(resume_from, map_location="cpu", weights_only=True)
    restored = torch.load(probe, map_location="cpu", weights_only=True)
    assert set(ckpt) == set(restored) == {"model", "heads", "ema", "optimizer", "lr_scheduler", "trainer"}
    for key in ("model", "heads", "ema", "optimizer", "lr_scheduler"):
        assert_same(ckpt[key], restored[key], key)
    assert_same(ckpt["trainer"], {**restored["trainer"], "max_epochs": ckpt["trainer"]["max_epochs"]}, "trainer")
    assert restored["trainer"]["iteration"] == saved * length and restored["trainer"]["max_epochs"] == epochs
    assert int(ckpt["ema"]["n_averaged"]) == saved * length  # one EMA update per iteration
    assert any(not torch.equal(ckpt["ema"]["module." + k], v) for k, v in ckpt["model"].items())  # a real EMA
    assert ckpt["optimizer"]["state"]

    final = torch.load(ckpt_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert final["trainer"]["iteration"] == epochs * length and final["trainer"]["max_epochs"] == epochs
    assert int(final["ema"]["n_averaged"]) == epochs * length
    # the learning rate follows its schedule per iteration
    assert final["lr_scheduler"]["last_epoch"] == ckpt["lr_scheduler"]["last_epoch"] + (epochs - saved) * length


@pytest.mark.integration
def test_ceds_same_seed_same_metrics(tmp_path, ct_data):
    """Two identical 2-epoch CPU runs (warm-up then semi-supervised) give identical losses, metrics and weights."""
    runs, logs = [], []
    for name in ("a", "b"):
        out = tmp_path / name
        cmd = ceds_cmd("--dataset_dir", str(ct_data), "--datalist", str(ct_data / "datalist_20.json"),
                       "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "train"), "--epochs", "2",
                       "--val_interval", "1", "--seed", "3", "--warmup", "0.5", "--confidence_interval", "0")
        proc = run_cmd(cmd, cwd=tmp_path, timeout=300, env=ENV)
        runs.append(out)
        # every iteration's losses and every validation's metrics, without the time stamps
        log = (proc.stdout + proc.stderr).splitlines()
        logs.append([ln.split(" - ")[-1] for ln in log if ITER_LINE.search(ln) or "val_mean_dice" in ln])
    assert len([ln for ln in logs[0] if ITER_LINE.search(ln)]) == 2 and any("val_mean_dice" in ln for ln in logs[0])
    assert logs[0] == logs[1]
    a, b = ((r / "train" / "validation" / "metrics.csv").read_text() for r in runs)
    assert a.startswith("val_mean_dice") and a == b  # the metrics of the last validation
    ckpt_a, ckpt_b = (torch.load(r / "models" / "checkpoint.pt", map_location="cpu", weights_only=True) for r in runs)
    for key in ("model", "ema", "optimizer"):
        assert_same(ckpt_a[key], ckpt_b[key], key)


@pytest.mark.integration
def test_liver_same_seed_same_metrics(tmp_path, liver_data):
    """Two identical 2-epoch CPU runs of the liver student (EMA consistency on, distillation off: no teacher
    checkpoint needed) give identical losses, metrics and weights."""
    runs, logs = [], []
    for name in ("a", "b"):
        out = tmp_path / name
        cmd = liver_cmd("--dataset_dir", str(liver_data), "--datalist", str(liver_data / "datalist_20.json"),
                        "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"), "--epochs", "2",
                        "--val_interval", "1", "--seed", "3")
        proc = run_cmd(cmd, cwd=tmp_path, timeout=300, env=ENV)
        runs.append(out)
        log = (proc.stdout + proc.stderr).splitlines()
        logs.append([ln.split(" - ")[-1] for ln in log if ITER_LINE.search(ln) or "val_mean_dice" in ln])
    assert len([ln for ln in logs[0] if ITER_LINE.search(ln)]) == 2 and any("val_mean_dice" in ln for ln in logs[0])
    assert any("loss_consistency: " in ln and "loss_consistency: 0.0000" not in ln
               for ln in logs[0] if ITER_LINE.search(ln))  # the EMA term is on
    assert logs[0] == logs[1]
    ckpt_a, ckpt_b = (torch.load(r / "models" / "checkpoint.pt", map_location="cpu", weights_only=True)
                      for r in runs)
    for key in ("model", "ema", "heads", "optimizer"):
        assert_same(ckpt_a[key], ckpt_b[key], key)
