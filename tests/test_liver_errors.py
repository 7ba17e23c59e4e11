"""``scripts/liver_errors.py``: counts that add up, per-lesion detection of all-tumour / all-background models, and
the lesion masks of the liver phantom it relies on."""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import liver_errors
import phantoms
from conftest import REPO, bundle_module, run_cmd

CHANNELS = [8, 16, 32, 64, 128]  # configs/cpu_demo.json, the script's default overlay


def _constant_model(path, tumour: bool, in_channels: int = 2, wrapped: bool = False):
    """A MEAMT-Net whose segmentation head ignores its input: tumour (or background) wins everywhere."""
    net = bundle_module("cdugjl_liver", "networks").MEAMTNet(in_channels=in_channels, channels=CHANNELS)
    state = net.state_dict()
    state["seg_head.weight"].zero_()
    state["seg_head.bias"].copy_(torch.tensor([-10.0, 10.0] if tumour else [10.0, -10.0]))
    torch.save({"model": state} if wrapped else state, path)  # wrapped: as train.json's checkpoint.pt
    return path


def _run(tmp_path, ckpt, liver_data, *extra):
    out = tmp_path / f"{ckpt.stem}.json"
    proc = run_cmd([sys.executable, str(REPO / "scripts" / "liver_errors.py"), "--checkpoint", str(ckpt),
                    "--datalist", str(liver_data / "datalist_100.json"), "--out", str(out), *extra],
                   cwd=tmp_path, timeout=300)
    assert "mean case Dice" in proc.stdout
    return json.loads(out.read_text())


def _check_pooled(result):
    cases, pooled = result["cases"], result["pooled"]
    for key in ("tp", "fp", "fn", "label_voxels", "fp_air"):
        assert pooled[key] == sum(c[key] for c in cases)
    assert pooled["fp_by_organ"] == {k: sum(c["fp_by_organ"][k] for c in cases) for k in pooled["fp_by_organ"]}
    assert abs(pooled["mean_case_dice"] - np.mean([c["dice"] for c in cases])) < 1e-9
    lesions = [s for c in cases for s in c["lesions"] if s["voxels"]]
    assert lesions, "the tiny phantom's validation cases hold no lesion"
    for kind, row in pooled["lesions_by_type"].items():
        mine = [s for s in lesions if s["type"] == kind]
        assert row["count"] == len(mine) and row["voxels"] == sum(s["voxels"] for s in mine)
        if mine:
            assert abs(row["mean_fraction_detected"] - np.mean([s["fraction_detected"] for s in mine])) < 1e-9
    assert sum(row["count"] for row in pooled["lesions_by_type"].values()) == len(lesions)
    for c in cases:
        assert sum(c["fp_by_organ"].values()) == c["fp"]
        assert 0 <= c["fp_air"] <= c["fp_by_organ"]["background"] <= c["fp"]
        assert c["label_voxels"] == c["tp"] + c["fn"]
    return lesions


def test_all_tumour_model_misses_nothing(tmp_path, liver_data):
    result = _run(tmp_path, _constant_model(tmp_path / "all_tumour.pt", tumour=True), liver_data)
    assert result["cases"] and result["split"] == "validation" and result["padding_mode"] == "replicate"
    lesions = _check_pooled(result)
    for case in result["cases"]:
        assert case["fn"] == 0 and case["tp"] == case["label_voxels"]
        assert case["fp"] > 0 and case["fp_air"] == case["air_voxels"] > 0  # all air is a false positive
    assert all(s["fraction_detected"] == 1.0 and s["detected"] == s["voxels"] for s in lesions)
    pooled = result["pooled"]
    assert pooled["fn"] == 0 and 0 < pooled["fp_air"] <= pooled["fp"]
    assert all(row["mean_fraction_detected"] == 1.0 for row in pooled["lesions_by_type"].values() if row["count"])
    assert all(m["called_tumour"] == m["voxels"] for case in result["cases"] for m in case["mimics"])


def test_modes_summary_scores_lesions_and_mimics_per_mode():
    cases = [{"lesions": [{"mode": 0, "voxels": 10, "fraction_detected": 1.0},
                          {"mode": 1, "voxels": 10, "fraction_detected": 0.2},
                          {"mode": None, "voxels": 10, "fraction_detected": 0.5},  # a fluid-like cyst
                          {"mode": 1, "voxels": 0, "fraction_detected": None}],  # lost to resampling
              "mimics": [{"mode": 1, "voxels": 20, "called_tumour": 5}]},
             {"lesions": [{"mode": 1, "voxels": 5, "fraction_detected": 0.4}], "mimics": []}]
    assert liver_errors.modes_summary(cases) == {
        0: {"lesions": 1, "lesion_fraction_detected": 1.0, "mimics": 0, "mimic_fraction_called_tumour": None},
        1: {"lesions": 2, "lesion_fraction_detected": 0.3, "mimics": 1, "mimic_fraction_called_tumour": 0.25}}
    assert liver_errors.modes_summary([{"lesions": [{"mode": None, "voxels": 3, "fraction_detected": 1.0}]}]) == {}


def test_all_background_teacher_detects_nothing(tmp_path, liver_data):
    ckpt = _constant_model(tmp_path / "all_background.pt", tumour=False, in_channels=3, wrapped=True)
    result = _run(tmp_path, ckpt, liver_data, "--teacher", "True", "--padding_mode", "constant")
    assert result["teacher"] and result["input_key"] == "ce" and result["padding_mode"] == "constant"
    lesions = _check_pooled(result)
    assert all(s["fraction_detected"] == 0.0 and s["dice"] == 0.0 for s in lesions)
    pooled = result["pooled"]
    assert pooled["tp"] == pooled["fp"] == pooled["fp_air"] == 0 and pooled["fn"] == pooled["label_voxels"] > 0
    assert all(row["mean_fraction_detected"] == 0.0 for row in pooled["lesions_by_type"].values() if row["count"])


def test_lesion_masks_make_the_label():
    seen = 0
    for index in range(6):
        case = phantoms.liver_case(index, seed=0, size=64, n_slices=8)
        masks = case["lesion_masks"]
        assert len(masks) == len(case["lesions"])
        union = np.zeros(case["label"].shape, bool)
        for mask in masks:
            assert mask.dtype == bool and mask.shape == case["label"].shape and mask.any()
            union |= mask
        np.testing.assert_array_equal(union, case["label"] > 0)
        seen += len(masks)
    assert seen > 0


def test_regeneration_must_match_the_label_file(liver_data):
    generator = json.loads((liver_data / "dataset.json").read_text())["generator"]
    labels = sorted((liver_data / "labelsTr").glob("liver_*.nii.gz"))
    path = next(p for p in labels if np.asanyarray(nib.load(p).dataobj).any())  # a case with lesions
    record = {"case": path.name.split(".")[0], "label": str(path)}
    assert liver_errors.regenerate(record, generator)["lesion_masks"] is not None
    with pytest.raises(ValueError, match="does not reproduce"):
        liver_errors.regenerate(record, {**generator, "seed": generator["seed"] + 1})
    with pytest.raises(ValueError, match="not liver_NNN"):
        liver_errors.regenerate({**record, "case": "patient_7"}, generator)


def test_teacher_regions_counts(tmp_path, liver_data):
    """``scripts/teacher_regions.py`` (which loads its teacher with ``liver_errors.load_network``): a teacher that
    calls every voxel tumour has every tumour-free voxel wrong, no background class, and confident evidence that
    the ``K / S >= 0.5`` gate never removes."""
    ckpt = _constant_model(tmp_path / "teacher.pt", tumour=True, in_channels=3)
    out = tmp_path / "regions.json"
    run_cmd([sys.executable, str(REPO / "scripts" / "teacher_regions.py"), "--checkpoint", str(ckpt),
             "--datalist", str(liver_data / "datalist_20.json"), "--cases", "2", "--out", str(out)],
            cwd=tmp_path, timeout=300)
    result = json.loads(out.read_text())
    tumour, background = result["tumour"], result["background"]
    assert result["settings"]["cases"] == 2 and background["voxels"] == 0 and tumour["voxels"] > 0
    labels = [np.asarray(nib.load(liver_data / "labelsTr" / f"{r['case']}.nii.gz").dataobj) for r in
              json.loads((liver_data / "datalist_20.json").read_text())["unlabeled"][:2]]
    assert 0 < tumour["wrong"] <= tumour["voxels"]
    if any(label.any() for label in labels):  # the real tumour voxels are the ones it gets right
        assert tumour["wrong"] < tumour["voxels"]
    assert tumour["threshold"]["removed"] == 0 and result["largest_uncertainty"] < 0.5


def test_distill_targets_counts_and_kl_of_constant_teacher_and_student(tmp_path, liver_data):
    """``scripts/distill_targets.py``: a teacher that calls every voxel tumour and a student that calls every voxel
    background are each right exactly where the other is wrong, at the evidence clamp everywhere; the Dirichlet KL
    and the class-probability KL are those of their two constant concentrations."""
    teacher = _constant_model(tmp_path / "teacher.pt", tumour=True, in_channels=3)
    student = _constant_model(tmp_path / "student.pt", tumour=False)
    out = tmp_path / "targets.json"
    run_cmd([sys.executable, str(REPO / "scripts" / "distill_targets.py"), "--teacher", str(teacher),
             "--student", str(student), "--datalist", str(liver_data / "datalist_20.json"), "--cases", "2",
             "--out", str(out)], cwd=tmp_path, timeout=300)
    result = json.loads(out.read_text())
    voxels = result["voxels"]
    assert result["settings"]["cases"] == 2 and result["tumour_voxels"] > 0
    assert voxels["both_right"] == voxels["both_wrong"] == 0
    assert voxels["teacher_right_only"] == result["tumour_voxels"]
    assert result["saturated"] == {"teacher": 1.0, "student": 1.0}
    high, low = float(np.exp(10.0)) + 1, float(np.exp(-10.0)) + 1
    alpha_t = torch.tensor([low, high], dtype=torch.float64)
    alpha_s = torch.tensor([high, low], dtype=torch.float64)
    kl = bundle_module("cdugjl_liver", "distillation").dirichlet_kl(alpha_t, alpha_s, dim=0)
    p_t, p_s = alpha_t / alpha_t.sum(), alpha_s / alpha_s.sum()
    assert result["kl"]["dirichlet"] == pytest.approx(float(kl), rel=1e-6)
    assert result["kl"]["class"] == pytest.approx(float((p_t * (p_t / p_s).log()).sum()), rel=1e-6)
    assert result["strength"]["teacher"] == pytest.approx(high + low, rel=1e-4)
