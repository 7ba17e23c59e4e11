"""Each bundle's ``multi_gpu_train.json`` under ``torchrun --nproc_per_node=2`` on CPU (gloo backend).

The run is what MONAI Label and the model-zoo multi-GPU CI start: ``torchrun ... -m monai.bundle run`` with
``['train.json', 'multi_gpu_train.json', 'cpu_demo.json']`` from a working directory outside the bundle, one epoch
on the phantom data (20 % labelled datalist), validation included, after the bundle's prerequisite stages (the liver
teacher). Checkpoints and outputs go to ``tmp_path``.
The final ``model.pt`` must be written exactly once, by rank 0. Every rank ends with the same student and the same
trainable loss heads (the liver loss's projections, which ``multi_gpu_train.json`` wraps in their own
``DistributedDataParallel``), although each rank starts from its own seed and trains on its own share of the data.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import BUNDLES, run_cmd, torchrun

DATA = {"ceds_mediastinum": "ct_data", "cdugjl_liver": "liver_data"}
# configs trained first (one process, one epoch, same ckpt_dir): the liver student distils from the contrast-enhanced
# teacher, models/teacher/model.pt, written by train.json + train_teacher.json (multi_gpu_train.json overlays
# train.json only)
PREREQUISITES = {"cdugjl_liver": [["train.json", "train_teacher.json"]]}
# what each rank saves when the run ends (before the process group goes): the parameters of the student, the one
# module DDP wraps (the served network and, in the liver bundle, the distillation heads), and of the loss (none)
# (buffers such as batch-norm statistics are each rank's own)
RANK_STATES = {
    "finalize": [
        "$torch.save({part: {k: v.detach() for k, v in getattr(module, 'module', module).named_parameters()} for "
        "part, module in [('student', @student), ('loss', @loss)]}, @output_dir + f'/rank{dist.get_rank()}.pt')",
        "$dist.barrier()",
        "$dist.destroy_process_group()",
    ]
}


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(DATA))
def test_torchrun_two_processes_one_epoch(name, request, tmp_path):
    """One epoch with two gloo processes completes, and only rank 0 saves ``model.pt`` (once)."""
    configs = BUNDLES / name / "configs"
    if not (configs / "multi_gpu_train.json").is_file():
        pytest.skip(f"{configs / 'multi_gpu_train.json'} does not exist yet")
    if shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").is_file():
        pytest.skip("torchrun is not installed")
    data = request.getfixturevalue(DATA[name])
    ckpt_dir, output_dir = tmp_path / "models", tmp_path / "eval"
    overrides = ["--bundle_root", str(BUNDLES / name), "--dataset_dir", str(data), "--datalist",
                 str(data / "datalist_20.json"), "--ckpt_dir", str(ckpt_dir), "--output_dir", str(output_dir),
                 "--epochs", "1", "--val_interval", "1"]
    for config in PREREQUISITES.get(name, []):
        files = repr([str(configs / c) for c in (*config, "cpu_demo.json")])
        run_cmd([sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *overrides], cwd=tmp_path,
                timeout=300, env={"OMP_NUM_THREADS": "2"})

    output_dir.mkdir(exist_ok=True)
    (tmp_path / "rank_states.json").write_text(json.dumps(RANK_STATES))
    files = repr([*(str(configs / c) for c in ("train.json", "multi_gpu_train.json", "cpu_demo.json")),
                  str(tmp_path / "rank_states.json")])
    cmd = [*torchrun(), "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "monai.bundle", "run",
           "--config_file", files, *overrides]
    proc = run_cmd(cmd, cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})

    log = proc.stdout + proc.stderr
    assert log.count("Epoch[1] Complete") >= 2, "both ranks must finish the epoch"
    assert (ckpt_dir / "model.pt").is_file()
    duplicates = [p.name for p in ckpt_dir.glob("model*.pt") if re.search(r"_\d+\.pt$|rank", p.name)]
    assert not duplicates, f"one model.pt, not one per rank or per save: {duplicates}"
    # where model.pt is the final checkpoint, its save is logged by the saving rank only
    saved = [line for line in log.splitlines() if "saved final checkpoint" in line and line.endswith("/model.pt")]
    assert len(saved) <= 1, f"model.pt must be saved once (rank 0 only), got: {saved}"
    state = torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)
    assert state and all(not k.startswith("module.") for k in state), "model.pt must hold the unwrapped network"

    ranks = [torch.load(output_dir / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1)]
    assert not ranks[0]["loss"], "every trainable parameter is the student's"
    first, second = ranks[0]["student"], ranks[1]["student"]
    assert first.keys() == second.keys()
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differ, f"the ranks' student parameters diverged: {differ[:5]}"
    if name == "cdugjl_liver":
        assert any(k.startswith("heads.") for k in ranks[0]["student"]), "the liver student has distillation heads"
