"""``scripts/ceds_errors.py``: voxel counts that add up, and a model that calls everything tumour misses nothing."""

from __future__ import annotations

import json
import sys

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
