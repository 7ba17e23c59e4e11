"""``scripts/ceds_errors.py``: voxel counts that add up, and a model that calls everything tumour misses nothing."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from conftest import REPO, bundle_module, run_cmd


def test_counts_of_an_all_tumour_model(tmp_path, ct_data):
    networks = bundle_module("ceds_mediastinum", "networks")
    net = networks.CEDSNet(channels=[4, 8, 16, 32, 64], dropout_prob_down=0.0, dropout_prob_up=[0.0, 0.0])
    state = net.state_dict()
    state["seg_decoder.out_tr.conv2.weight"].zero_()
    state["seg_decoder.out_tr.conv2.bias"].copy_(torch.tensor([-10.0, 10.0]))  # tumour logit wins everywhere
    ckpt = tmp_path / "all_tumour.pt"
    torch.save(state, ckpt)
    out = tmp_path / "errors.json"
    run_cmd([sys.executable, str(REPO / "scripts" / "ceds_errors.py"), "--checkpoint", str(ckpt), "--datalist",
             str(ct_data / "datalist_100.json"), "--out", str(out)], cwd=tmp_path, timeout=300)
    result = json.loads(out.read_text())
    assert result["cases"] and result["split"] == "validation"
    for case in result["cases"]:
        assert case["fn"] == 0 and case["tp"] == case["label_voxels"]  # nothing missed
        assert sum(case["fp_by_organ"].values()) == case["fp"] > 0
        assert case["dice"] < 0.5 and case["missed_median_hu"] is None
    pooled = result["pooled"]
    assert pooled["fp"] == sum(c["fp"] for c in result["cases"]) and pooled["fn"] == 0
    assert abs(pooled["mean_case_dice"] - sum(c["dice"] for c in result["cases"]) / len(result["cases"])) < 1e-9


def test_mask_audit_of_an_all_tumour_teacher(tmp_path, ct_data):
    """A teacher that calls every voxel tumour finds all tumour (recall 1) with the label's share as precision;
    the per-class mask keeps half of its voxels, and no tumour voxel gets a background target."""
    networks = bundle_module("ceds_mediastinum", "networks")
    net = networks.CEDSNet(channels=[4, 8, 16, 32, 64], dropout_prob_down=0.0, dropout_prob_up=[0.0, 0.0])
    state = net.state_dict()
    state["seg_decoder.out_tr.conv2.weight"].zero_()
    state["seg_decoder.out_tr.conv2.bias"].copy_(torch.tensor([-10.0, 10.0]))
    ema = {f"module.{k}": v for k, v in state.items()} | {"n_averaged": torch.tensor(1)}
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": state, "ema": ema}, ckpt)
    out = tmp_path / "audit.json"
    run_cmd([sys.executable, str(REPO / "scripts" / "ceds_mask_audit.py"), "--checkpoint", str(ckpt), "--datalist",
             str(ct_data / "datalist_20.json"), "--labels", str(ct_data / "datalist_100.json"), "--batches", "3",
             "--out", str(out)], cwd=tmp_path, timeout=300)
    result = json.loads(out.read_text())
    tumour = result["counts"]["tumour"]
    assert result["counts"]["background"]["voxels"] == 0 and tumour["voxels"] > 0
    assert result["tumour_recall"] == 1.0 and result["tumour_kept_as_background"] == 0.0
    assert result["tumour_precision"] == tumour["tumour"] / tumour["voxels"]
    assert 0.5 <= result["kept_share"]["tumour"] < 0.55  # the most confident half, ties at the cut kept


def test_auroc_of_histograms():
    from ceds_mask_audit import BINS, histogram_auroc

    low, high = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    low[10], high[900] = 5, 7
    # correct voxels scored above / below wrong ones
    assert histogram_auroc(high, low) == 1.0 and histogram_auroc(low, high) == 0.0
    assert histogram_auroc(high, high) == 0.5 and histogram_auroc(high, np.zeros(BINS, np.int64)) is None


def test_head_fit_trains_the_confidence_branch_alone(tmp_path, ct_data):
    """``scripts/ceds_head_fit.py`` moves the confidence head and nothing else: the segmentation's scores on the
    fixed patches stay the same from one scoring to the next while the head's change."""
    networks = bundle_module("ceds_mediastinum", "networks")
    torch.manual_seed(0)
    net = networks.CEDSNet(channels=[4, 8, 16, 32, 64], dropout_prob_down=0.0, dropout_prob_up=[0.0, 0.0])
    state = net.state_dict()
    state["seg_decoder.out_tr.conv2.bias"].copy_(torch.tensor([-1.0, 1.0]))  # mostly tumour, not everywhere alike
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": state}, ckpt)
    out = tmp_path / "fit.json"
    run_cmd([sys.executable, str(REPO / "scripts" / "ceds_head_fit.py"), "--checkpoint", str(ckpt), "--datalist",
             str(ct_data / "datalist_20.json"), "--fresh", "--iterations", "4", "--every", "2", "--eval_batches", "2",
             "--out", str(out)], cwd=tmp_path, timeout=300)
    curve = json.loads(out.read_text())["curve"]
    assert [c["iteration"] for c in curve] == [0, 2, 4]
    assert curve[0]["loss"] is None and all(c["loss"] > 0 for c in curve[1:])
    for split in ("training", "validation"):
        first, last = curve[0][split], curve[-1][split]
        assert first["predicted_tumour_voxels"] > 0
        assert last["auroc_probability"] == first["auroc_probability"]  # the segmentation is frozen
        assert last["predicted_tumour_voxels"] == first["predicted_tumour_voxels"]
        assert last["mean_head"] != first["mean_head"]  # the head is not
        assert len(first["hidden_median"]["tumour"]) == 2  # the output transition's two hidden units
        assert all(0.0 < slope <= 1.0 for slope in first["elu_slope_at_median"]["tumour"])
