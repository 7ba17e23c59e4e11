"""Unit tests of the CdUgJL liver bundle's data code: datalist loading, quantification targets and reports."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import bundle_module
from monai.data import MetaTensor

BUNDLE = "cdugjl_liver"


def _datalist():
    return bundle_module(BUNDLE, "datalist")


def _transforms():
    return bundle_module(BUNDLE, "transforms")


def _quantification():
    return bundle_module(BUNDLE, "quantification")


# --------------------------------------------------------------------------------------------------------------
# load_datalist
# --------------------------------------------------------------------------------------------------------------


def _paths(record: dict, key: str) -> list[str]:
    value = record[key]
    return [value] if isinstance(value, str) else list(value)


def test_load_datalist_resolves_every_path(liver_data):
    load_datalist = _datalist().load_datalist
    datalist = liver_data / "datalist_20.json"
    raw = json.loads(datalist.read_text())
    for split in ("training", "unlabeled", "validation", "test"):
        records = load_datalist(str(datalist), split)
        assert len(records) == len(raw[split]) and records, split
        for record, original in zip(records, raw[split]):
            assert record["case"] == original["case"]
            for key in ("image", "ce", "label", "organs"):
                if key in original:
                    for path in _paths(record, key):
                        assert os.path.isabs(path) and os.path.isfile(path), (split, key, path)
            assert record["image"] == [str(liver_data / p) for p in original["image"]]
    assert all("label" not in r and "organs" not in r for r in load_datalist(str(datalist), "unlabeled"))
    assert all("label" in r for r in load_datalist(str(datalist), "training"))


def test_load_datalist_image_key_switch(liver_data):
    load_datalist = _datalist().load_datalist
    records = load_datalist(liver_data / "datalist_100.json", "training", image_key="ce")
    for record in records:
        assert "ce" not in record and len(record["image"]) == 3  # moved: the CE phases are loaded once
        assert all(p.endswith(("_art.nii.gz", "_pv.nii.gz", "_delay.nii.gz")) for p in record["image"])


def test_load_datalist_reads_the_old_name_of_the_ce_phases(tmp_path, liver_data, caplog):
    """Datalists of bundle versions before 0.5.0 named the CE phases ``image_ce``: read as ``ce``, warned once."""
    load_datalist = _datalist().load_datalist
    raw = json.loads((liver_data / "datalist_100.json").read_text())
    old = {split: [{("image_ce" if k == "ce" else k): v for k, v in r.items()} for r in records]
           for split, records in raw.items()}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    with caplog.at_level("WARNING"):
        records = load_datalist(path, "training", base_dir=liver_data)
    assert records == load_datalist(liver_data / "datalist_100.json", "training")
    assert sum("'image_ce' is now named 'ce'" in r.message for r in caplog.records) == 1
    old["training"][0]["ce"] = old["training"][0]["image_ce"]
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="both 'ce' and"):
        load_datalist(path, "training", base_dir=liver_data)


def test_load_datalist_missing_split_and_errors(tmp_path, liver_data):
    load_datalist = _datalist().load_datalist
    assert load_datalist(liver_data / "datalist_100.json", "unlabeled") == []  # 100 %: nothing unlabelled
    with pytest.raises(FileNotFoundError):
        load_datalist(tmp_path / "nope.json", "training")

    absolute = str(liver_data / "imagesTr" / "liver_000_t2w.nii.gz")
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": [{"case": "a", "image": absolute, "label": "missing.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_datalist(path, "training")
    records = load_datalist(path, "training", check_files=False)
    assert records[0]["image"] == absolute and records[0]["label"] == str(tmp_path / "missing.nii.gz")

    path.write_text(json.dumps({"training": {"image": "x"}, "test": [{"image": 3}], "validation": [{"case": "a"}]}))
    with pytest.raises(ValueError, match="list of records"):
        load_datalist(path, "training")
    with pytest.raises(TypeError, match="'image'"):
        load_datalist(path, "test", check_files=False)
    with pytest.raises(ValueError, match="no 'image'"):
        load_datalist(path, "validation", check_files=False)


# --------------------------------------------------------------------------------------------------------------
# QuantificationTargetsd
# --------------------------------------------------------------------------------------------------------------


def _slice(array: np.ndarray, spacing=(0.8, 0.7), origin=(-12.0, 40.0)) -> MetaTensor:
    affine = np.array([[spacing[0], 0, origin[0]], [0, spacing[1], origin[1]], [0, 0, 1]], dtype=np.float64)
    return MetaTensor(torch.as_tensor(array, dtype=torch.float32)[None], affine=torch.as_tensor(affine))


def test_quantification_targets_values_and_spacing():
    targets = _transforms().QuantificationTargetsd(keys="label")
    label = np.zeros((10, 12))
    label[2:5, 3:7] = 1  # 3 x 4 pixels, centroid index (3, 4.5)
    out = targets({"label": _slice(label), "image": "untouched"})
    assert out["image"] == "untouched"
    assert out["quant"].dtype == torch.float32 and out["quant"].shape == (3,)
    np.testing.assert_allclose(out["quant"].numpy(), [3 * 0.8, 4.5 * 0.7, 12 * 0.8 * 0.7], rtol=1e-6)
    np.testing.assert_array_equal(out["quant_mask"].numpy(), [1, 1, 1])

    # an unsqueezed [1, H, W, 1] slice of a 3D volume gives the same values (spacing of the first two axes)
    affine3 = torch.as_tensor(np.diag([0.8, 0.7, 5.0, 1.0]))
    volume = MetaTensor(torch.as_tensor(label, dtype=torch.float32)[None, ..., None], affine=affine3)
    np.testing.assert_allclose(targets({"label": volume})["quant"].numpy(), out["quant"].numpy(), rtol=1e-6)

    # a plain tensor needs an explicit pixdim
    with pytest.raises(ValueError, match="pixdim"):
        targets({"label": torch.as_tensor(label)[None]})
    plain = _transforms().QuantificationTargetsd(keys="label", pixdim=(2.0, 1.0))
    np.testing.assert_allclose(plain({"label": torch.as_tensor(label)[None]})["quant"].numpy(), [6.0, 4.5, 24.0])


def test_quantification_targets_follow_spatial_transforms():
    """Targets computed after a 90 degree rotation use the rotated spacing: same area, centre in the new frame."""
    from monai.transforms import Rotate90d

    label = np.zeros((10, 12))
    label[2:5, 3:7] = 1
    targets = _transforms().QuantificationTargetsd(keys="label")
    rotated = Rotate90d(keys="label")({"label": _slice(label, spacing=(0.8, 0.5))})
    assert rotated["label"].shape == (1, 12, 10)
    out = targets(rotated)["quant"].numpy()
    # rotated pixel (i, j) = original (j, 11 - i): centroid index (11 - 4.5, 3) with spacings (0.5, 0.8)
    np.testing.assert_allclose(out, [6.5 * 0.5, 3 * 0.8, 12 * 0.8 * 0.5], rtol=1e-5)


def test_quantification_targets_no_tumour_and_missing_label():
    transforms = _transforms()
    out = transforms.QuantificationTargetsd(keys="label")({"label": _slice(np.zeros((6, 6)))})
    np.testing.assert_array_equal(out["quant"].numpy(), [0, 0, 0])
    np.testing.assert_array_equal(out["quant_mask"].numpy(), [0, 0, 1])
    unlabelled = transforms.QuantificationTargetsd(keys="label", allow_missing_keys=True)({"image": 1})
    assert "quant" not in unlabelled
    with pytest.raises(KeyError):
        transforms.QuantificationTargetsd(keys="label")({"image": 1})
    with pytest.raises(ValueError, match="slice"):
        transforms.QuantificationTargetsd(keys="label")({"label": _slice(np.zeros((6, 6)))[None]})


# --------------------------------------------------------------------------------------------------------------
# quantify_mask
# --------------------------------------------------------------------------------------------------------------


def test_quantify_mask_hand_built():
    quantify_mask = _quantification().quantify_mask
    mask = np.zeros((10, 12, 5), dtype=np.uint8)
    mask[2:5, 3:7, 1:3] = 1  # lesion A: 3 x 4 pixels on slices 1 and 2
    mask[8, 10, 4] = 2  # lesion B: one voxel (label value 2: any label > 0 is tumour)
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 30.0]
    uncertainty = np.zeros(mask.shape)
    uncertainty[mask > 0] = 0.5
    uncertainty[8, 10, 4] = 0.25
    out = quantify_mask(mask, affine, uncertainty=uncertainty)

    assert out["spacing"] == pytest.approx([0.8, 0.8, 5.0]) and out["shape"] == [10, 12, 5]
    assert out["pixel_area_mm2"] == pytest.approx(0.64) and out["voxel_volume_mm3"] == pytest.approx(3.2)
    assert out["total_volume_mm3"] == pytest.approx(25 * 3.2)
    assert [s["slice"] for s in out["slices"]] == [1, 2, 4]
    first = out["slices"][0]
    assert first["area_mm2"] == pytest.approx(12 * 0.64) and first["n_pixels"] == 12
    assert first["centre_world_mm"] == pytest.approx([-10 + 3 * 0.8, 20 + 4.5 * 0.8, 30 + 5.0])

    big, small = out["lesions"]  # sorted by volume
    assert big["lesion"] == 1 and big["n_voxels"] == 24 and big["volume_mm3"] == pytest.approx(24 * 3.2)
    assert big["centroid_world_mm"] == pytest.approx([-7.6, 23.6, 37.5])
    assert big["slice_range"] == [1, 2] and big["n_slices"] == 2
    assert big["max_area_mm2"] == pytest.approx(7.68) and big["max_area_slice"] == 1
    assert big["max_diameter_mm"] == pytest.approx(np.hypot(2 * 0.8, 3 * 0.8))  # corner to corner pixel centres
    assert big["mean_uncertainty"] == pytest.approx(0.5)
    assert small["volume_mm3"] == pytest.approx(3.2) and small["max_diameter_mm"] == 0.0
    assert small["centroid_world_mm"] == pytest.approx([-10 + 8 * 0.8, 20 + 10 * 0.8, 50.0])
    assert small["mean_uncertainty"] == pytest.approx(0.25)
    json.dumps(out)  # JSON-serialisable


def test_quantify_mask_connectivity_and_flipped_affine():
    quantification = _quantification()
    mask = np.zeros((6, 6, 2), dtype=bool)
    mask[1, 1, 0] = mask[2, 2, 1] = True  # touching only at a corner
    assert len(quantification.quantify_mask(mask, np.eye(4))["lesions"]) == 1
    assert len(quantification.quantify_mask(mask, np.eye(4), connectivity=1)["lesions"]) == 2
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])  # LPS-style flipped axes: areas/volumes stay positive
    out = quantification.quantify_mask(mask, affine)
    assert out["total_volume_mm3"] == pytest.approx(2 * 0.5)
    assert out["slices"][1]["centre_world_mm"] == pytest.approx([-1.0, -1.0, 2.0])
    empty = quantification.quantify_mask(np.zeros((3, 3, 3)), np.eye(4))
    assert empty["slices"] == [] and empty["lesions"] == [] and empty["total_volume_mm3"] == 0


# --------------------------------------------------------------------------------------------------------------
# SaveQuantificationd
# --------------------------------------------------------------------------------------------------------------


def test_save_quantification_report(tmp_path):
    transforms = _transforms()
    affine = np.diag([0.8, 0.7, 5.0, 1.0])
    affine[:3, 3] = [-100.0, 50.0, 20.0]
    shape = (10, 12, 4)
    mask = np.zeros(shape, dtype=np.float32)
    mask[2:5, 3:7, 1] = 1  # tumour on slice 1 only
    pred = MetaTensor(torch.as_tensor(mask)[None], affine=torch.as_tensor(affine))
    image = MetaTensor(torch.zeros(2, *shape), affine=torch.as_tensor(affine),
                       meta={"filename_or_obj": "/data/imagesTr/liver_007_t2w.nii.gz"})
    # NIG params per slice: (gamma, nu, alpha, beta) for (x, y, area)
    quant = torch.zeros(shape[2], 3, 4)
    quant[..., 1], quant[..., 2], quant[..., 3] = 1.0, 2.0, 1.0  # aleatoric var = 1, epistemic var = 1
    quant[1, :, 0] = torch.tensor([2.4, 3.15, 8.0])  # slice 1: centre (2.4, 3.15) mm, area 8 mm^2
    quant[1, :, 1] = 4.0  # epistemic var = 1 / 4
    quant[3, :, 0] = torch.tensor([0.8, 1.4, 20.0])  # slice 3: the network alone says tumour
    quant[2, 2, 0] = 0.1  # below one pixel (0.56 mm^2): not reported
    uncertainty = torch.full((1, *shape), 0.3)

    data = {"image": image, "pred": pred, "quant": quant, "uncertainty": uncertainty}
    out = transforms.SaveQuantificationd(keys=("pred", "quant"), output_dir=tmp_path)(data)
    assert out is data
    report_path = tmp_path / "liver_007" / "liver_007_quantification.json"
    report = json.loads(report_path.read_text())
    assert sorted(os.listdir(report_path.parent)) == ["liver_007_quantification.json"]  # no temp file left
    assert report["case"] == "liver_007" and report["source"].endswith("liver_007_t2w.nii.gz")
    assert report["geometry"]["spacing"] == pytest.approx([0.8, 0.7, 5.0])
    assert report["geometry"]["shape"] == [10, 12, 4]
    assert [s["slice"] for s in report["slices"]] == [1, 3]

    s1 = report["slices"][0]
    net = s1["network"]
    assert net["tumour"] and net["centre_slice_mm"] == pytest.approx([2.4, 3.15])
    assert net["centre_world_mm"] == pytest.approx([-100 + 2.4, 50 + 3.15, 20 + 5.0])  # index (3, 4.5, 1)
    assert net["centre_aleatoric_std_mm"] == pytest.approx([1.0, 1.0, 0.0])
    assert net["centre_epistemic_std_mm"] == pytest.approx([0.5, 0.5, 0.0])
    assert net["area_mm2"] == pytest.approx(8.0)
    assert net["area_aleatoric_std_mm2"] == pytest.approx(1.0) and net["area_epistemic_std_mm2"] == pytest.approx(0.5)
    assert s1["mask"]["area_mm2"] == pytest.approx(12 * 0.8 * 0.7)
    assert s1["mask"]["centre_world_mm"] == pytest.approx(net["centre_world_mm"])  # same centre as the network

    s3 = report["slices"][1]
    assert s3["network"]["centre_world_mm"] == pytest.approx([-100 + 0.8, 50 + 1.4, 35.0])
    assert s3["mask"] == {"area_mm2": 0.0, "centre_world_mm": None}

    # slice 1 agrees with the mask; on slice 3 the network alone reports 20 mm^2 (36 pixels)
    assert report["implausible"] == ["slice 3: the network reports 20 mm^2 of tumour where the mask has none"]

    (lesion,) = report["lesions"]
    assert lesion["volume_mm3"] == pytest.approx(12 * 0.8 * 0.7 * 5.0)
    assert lesion["mean_uncertainty"] == pytest.approx(0.3)
    assert report["units"]["area"] == "mm^2"


def test_implausible_slices():
    """Each rule flags what it should and nothing else (pixel 1 mm^2, 20 pixels count as tumour)."""
    implausible = _quantification().implausible_slices

    def entry(k, a_net, a_mask, net_c=(0.0, 0.0, 0.0), mask_c=(0.0, 0.0, 0.0)):
        return {"slice": k, "network": {"area_mm2": a_net, "centre_world_mm": list(net_c)},
                "mask": {"area_mm2": a_mask, "centre_world_mm": list(mask_c) if a_mask else None}}

    agree = [entry(0, 100.0, 120.0, (1.0, 1.0, 0.0)), entry(1, 5.0, 0.0), entry(2, 0.0, 10.0), {"slice": 3, "mask": {}}]
    assert implausible(agree, 1.0) == []
    found = implausible([entry(0, 30.0, 0.0), entry(1, 0.0, 30.0), entry(2, 100.0, 30.0),
                         entry(3, 100.0, 100.0, (10.0, 0.0, 0.0))], 1.0)
    assert [s.split(":")[0] for s in found] == ["slice 0", "slice 1", "slice 2", "slice 3"]
    assert "where the mask has none" in found[0] and "where the network reports none" in found[1]
    assert "100 mm^2 against 30 mm^2" in found[2] and "10 mm from the mask's" in found[3]


def test_save_quantification_without_network(tmp_path):
    transforms = _transforms()
    mask = torch.zeros(2, 4, 4, 3)
    mask[0] = 1
    mask[1, 1:3, 1:3, 2] = 1  # two-channel one-hot prediction: argmax > 0 is tumour
    mask[0, 1:3, 1:3, 2] = 0
    pred = MetaTensor(mask, affine=torch.eye(4))
    save = transforms.SaveQuantificationd(output_dir=tmp_path, allow_missing_keys=True)
    save({"pred": pred, "image": torch.zeros(1, 4, 4, 3), "case": "c9"})
    report = json.loads((tmp_path / "c9" / "c9_quantification.json").read_text())
    assert [s["slice"] for s in report["slices"]] == [2] and "network" not in report["slices"][0]
    assert report["total_volume_mm3"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="quant"):
        save({"pred": pred, "quant": torch.zeros(2, 3, 4), "case": "c9"})
