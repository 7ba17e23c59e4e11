"""The quick start's report: metric formatting and the per-bundle overview figure."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

import case_figure
import quickstart


def test_missing_metrics_are_words():
    assert quickstart.format_metric("test_mean_dice", 0.81234) == "test_mean_dice=0.812"
    assert quickstart.format_metric("test_hd95_mm", math.nan) == "test_hd95_mm=n/a: no tumour predicted"
    assert quickstart.format_metric("test_area_mae_mm2", math.inf) == "test_area_mae_mm2=n/a: no tumour predicted"
    assert quickstart.format_metric("test_ece", math.nan) == "test_ece=n/a: undefined on these cases"
    assert "nan" not in quickstart.format_metric("dice", math.nan) and "inf" not in quickstart.format_metric(
        "hd95", -math.inf)


def test_case_figure_cuts_through_the_most_tumour(tmp_path):
    shape = (16, 12, 5)
    label = np.zeros(shape, np.uint8)
    label[4:8, 4:8, 3] = 1
    label[5:6, 5:6, 1] = 1
    files = {}
    for name, array in (("image", np.random.default_rng(0).normal(size=(*shape, 2)).astype(np.float32)),
                        ("label", label), ("pred", label), ("extra", label.astype(np.float32) * 0.3)):
        files[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, np.eye(4)), files[name])
    panel = case_figure.case_panel("case", files["image"], files["label"], files["pred"], files["extra"],
                                   "uncertainty")
    assert panel.title == "case, slice 3" and panel.image.shape == shape[:2]
    np.testing.assert_array_equal(panel.label, label[..., 3])
    assert panel.extra.max() == pytest.approx(0.3)
    path = case_figure.draw([panel, panel], tmp_path / "figures" / "out.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
