"""Tests of ``bundles/cdugjl_liver/scripts/prepare_lld_mmri.py`` on a generated tree with the LLD-MMRI layout.

The fake release mimics the real one: ``images/<patientID>/<studyUID>/<seriesUID>.nii.gz`` with identity (wrong)
NIfTI headers, ``labels/Annotation.json`` with ``Annotation_info[patientID]`` = per-phase entries, and MedSAM2-style
masks ``<patientID>_<category>_<phase without spaces>[_0000].nii.gz``. Every image is a linear ramp of the WORLD
coordinates given by Annotation.json, so a correctly resampled phase equals the ramp evaluated on the T2WI grid.
"""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLES, bundle_module, run_cmd

BUNDLE = "cdugjl_liver"
SCRIPT = BUNDLES / BUNDLE / "scripts" / "prepare_lld_mmri.py"

# per phase: matrix, pixel spacing, slice spacing, origin offset (mm) relative to the T2WI origin
GEOMETRY = {
    "T2WI": ((24, 20, 6), (0.75, 0.75), 7.0, (0.0, 0.0, 0.0)),
    "DWI": ((12, 12, 5), (1.25, 1.25), 8.0, (-1.0, -2.0, 3.0)),
    "In Phase": ((24, 20, 6), (0.75, 0.75), 7.0, (0.0, 0.0, 0.0)),
    "C+A": ((20, 18, 8), (0.9, 0.9), 6.0, (-1.0, 1.0, -2.0)),
    "C+V": ((20, 18, 8), (0.9, 0.9), 6.0, (-1.5, 0.5, -2.0)),
    "C+Delay": ((20, 18, 8), (0.9, 0.9), 6.0, (-1.0, 1.0, -2.0)),
}
PHASE_VALUE = {"T2WI": 0.0, "DWI": 100.0, "In Phase": 200.0, "C+A": 300.0, "C+V": 400.0, "C+Delay": 500.0}
# patient -> (phases with an entry, phases whose series file is absent, mask phases -> file-name pattern)
PATIENTS = {
    "MR1001": (list(GEOMETRY), [], {"T2WI": "{p}_6_T2WI_0000.nii.gz"}),
    "MR_1002": (["T2WI", "DWI", "C+A", "C+V"], [], {"C+V": "sub/{p}_3_C+V.nii.gz", "DWI": "{p}_3_DWI_0000.nii.gz"}),
    "MR1003": (["T2WI", "DWI"], [], {}),
    "MR1004": (["T2WI", "C+A", "C+V", "C+Delay"], [], {"T2WI": "{p}_1_T2WI_0000.nii.gz"}),
    "MR1005": (list(GEOMETRY), ["DWI"], {"T2WI": "{p}_1_T2WI_0000.nii.gz"}),
    "MR1006": (list(GEOMETRY), [], {"T2WI": "{p}_T2WI.nii.gz"}),
    "MR1007": (list(GEOMETRY), [], {"T2WI": "{p}_0_T2WI_0000.nii.gz"}),
}
T2_ORIGIN = (118.5, 91.25, -33.0)
RAMP = np.array([0.5, -0.25, 0.1])  # image = phase value + RAMP . world (mm)


def true_affine(phase: str) -> np.ndarray:
    """RAS affine of the geometry written into Annotation.json (identity LPS direction)."""
    _, (sx, sy), sz, offset = GEOMETRY[phase]
    origin = np.add(T2_ORIGIN, offset)
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [-origin[0], -origin[1], origin[2]]
    return affine


def world(shape, affine) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    return index @ affine[:3, :3].T + affine[:3, 3]


def block_mask(shape, affine, lo, hi) -> np.ndarray:
    """Voxels whose world centre lies in the box [lo, hi] (mm); label 2 for one corner voxel to test binarising."""
    w = world(shape, affine)
    mask = np.all((w >= lo) & (w <= hi), axis=-1).astype(np.uint8)
    first = np.argwhere(mask)[0]
    mask[tuple(first)] = 2
    return mask


LESION_LO, LESION_HI = np.array([-128.0, -100.0, -19.0]), np.array([-122.0, -95.0, -6.0])  # RAS mm, inside T2WI


def make_release(base, rng) -> tuple:
    root, masks = base / "LLD-MMRI", base / "masks"
    annotation = {}
    for patient, (phases, absent, mask_files) in PATIENTS.items():
        study = "1.2.840." + "".join(rng.choice(list("0123456789"), 12))
        entries = []
        for phase in phases:
            shape, spacing, slice_spacing, offset = GEOMETRY[phase]
            series = "1.3.12.2." + "".join(rng.choice(list("0123456789"), 16))
            origin = [float(v) for v in np.add(T2_ORIGIN, offset)]
            entries.append({
                "studyUID": study, "seriesUID": series, "phase": phase,
                "pixel_spacing": list(spacing), "slice_thickness": slice_spacing - 1.0, "slice_spacing": slice_spacing,
                "origin": origin,
                "annotation": {"num_targets": 1, "lesion": {"0": {"category": 6, "bbox": {"3D_box": {
                    "x_min": 3, "y_min": 4, "z_min": 1, "x_max": 9, "y_max": 10, "z_max": 3}}}}},
            })
            if phase in absent:
                continue
            image = PHASE_VALUE[phase] + world(shape, true_affine(phase)) @ RAMP
            image = np.round(image).astype(np.int16) if phase == "T2WI" else image.astype(np.float32)
            path = root / "images" / patient / study / f"{series}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(image, np.eye(4)), path)
        for phase, pattern in mask_files.items():
            shape = GEOMETRY[phase][0]
            path = masks / pattern.format(p=patient)
            path.parent.mkdir(parents=True, exist_ok=True)
            mask = block_mask(shape, true_affine(phase), LESION_LO, LESION_HI)
            nib.save(nib.Nifti1Image(mask, np.eye(4)), path)  # headers of the masks are ignored
        annotation[patient] = entries
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "Annotation.json").write_text(json.dumps({"Annotation_info": annotation}))
    return root, masks


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("lld"), np.random.default_rng(0))


@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory):
    prep = bundle_module(BUNDLE, "prepare_lld_mmri")
    out = tmp_path_factory.mktemp("lld_out")
    paths = prep.prepare(str(release[0]), str(release[1]), str(out), label_ratio=[0.5, 1.0], seed=0)
    return out, paths


def test_geometry_and_resampling(prepared):
    out, _ = prepared
    t2_affine = true_affine("T2WI")
    t2 = nib.load(out / "imagesTr" / "MR1001_t2w.nii.gz")
    np.testing.assert_allclose(t2.header.get_zooms()[:3], (0.75, 0.75, 7.0))  # spacing from Annotation.json
    np.testing.assert_allclose(t2.affine, t2_affine, atol=1e-4)
    expected = world(GEOMETRY["T2WI"][0], t2_affine) @ RAMP
    np.testing.assert_allclose(t2.get_fdata(), np.round(expected), atol=1e-3)  # int16 source

    for suffix, phase in (("dwi", "DWI"), ("art", "C+A"), ("pv", "C+V"), ("delay", "C+Delay")):
        img = nib.load(out / "imagesTr" / f"MR1001_{suffix}.nii.gz")
        assert img.shape == t2.shape and img.get_data_dtype() == np.float32
        np.testing.assert_allclose(img.affine, t2.affine, atol=1e-4)
        # inside the source field of view the resampled ramp equals the ramp on the T2WI grid (true geometry used)
        points = np.c_[world(t2.shape, t2_affine).reshape(-1, 3), np.ones(int(np.prod(t2.shape)))]
        src = (points @ np.linalg.inv(true_affine(phase)).T)[:, :3].reshape(*t2.shape, 3)
        last = np.array(GEOMETRY[phase][0]) - 1
        inside = np.all((src >= 0) & (src <= last), axis=-1)
        assert inside.sum() > 100, phase
        np.testing.assert_allclose(img.get_fdata()[inside], (PHASE_VALUE[phase] + expected)[inside], atol=1e-2)
        far = np.any((src < -1) | (src > last + 1), axis=-1)  # over one voxel outside: zero padding
        assert far.sum() > 0 and np.all(img.get_fdata()[far] == 0), phase


def test_labels_and_mask_fallback(prepared):
    out, _ = prepared
    t2_affine = true_affine("T2WI")
    expected = block_mask(GEOMETRY["T2WI"][0], t2_affine, LESION_LO, LESION_HI) > 0
    label = nib.load(out / "labelsTr" / "MR1001.nii.gz")
    assert label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(label.affine, t2_affine, atol=1e-4)
    np.testing.assert_array_equal(label.get_fdata() > 0, expected)
    assert set(np.unique(label.get_fdata())) == {0, 1}

    # MR_1002 has only a C+V mask (named without _0000, in a sub-folder): resampled (nearest) onto T2WI
    fallback = nib.load(out / "labelsTr" / "MR_1002.nii.gz").get_fdata()
    assert fallback.shape == GEOMETRY["T2WI"][0] and set(np.unique(fallback)) == {0, 1}
    centres = world(fallback.shape, t2_affine)[fallback > 0]
    half = np.array([0.45, 0.45, 3.0]) + 1e-6  # half a C+V voxel
    assert np.all(centres >= LESION_LO - half) and np.all(centres <= LESION_HI + half)
    assert abs(int(fallback.sum()) - int(expected.sum())) <= 0.5 * expected.sum()

    info = json.loads((out / "preparation.json").read_text())
    cases = info["cases"]
    assert cases["MR1001"]["mask_source"] == "T2WI" and cases["MR_1002"]["mask_source"] == "C+V"
    assert cases["MR1003"]["mask_source"] is None and cases["MR1006"]["mask_source"] == "T2WI"
    assert cases["MR1001"]["spacing"] == pytest.approx([0.75, 0.75, 7.0])
    assert cases["MR1001"]["lesion_categories"] == [6]
    # missing phases: C+Delay replaced by C+V; no CE at all -> no ce; no DWI -> skipped
    assert cases["MR_1002"]["ce_substitutes"] == {"C+Delay": "C+V"} and cases["MR_1002"]["missing_ce"] == ["C+Delay"]
    assert cases["MR1003"]["missing_ce"] == ["C+A", "C+V", "C+Delay"]
    assert set(info["skipped"]) == {"MR1004", "MR1005"}
    assert "DWI entry" in info["skipped"]["MR1004"] and "file missing" in info["skipped"]["MR1005"]
    delay = nib.load(out / "imagesTr" / "MR_1002_delay.nii.gz").get_fdata()
    np.testing.assert_array_equal(delay, nib.load(out / "imagesTr" / "MR_1002_pv.nii.gz").get_fdata())


def test_datalists(prepared):
    out, paths = prepared
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["datalist_50.json", "datalist_100.json"]
    load_datalist = bundle_module(BUNDLE, "datalist").load_datalist
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 5 and dataset["modality"] == {"0": "T2WI", "1": "DWI"}

    splits = {}
    for path in paths:
        raw = json.loads(open(path).read())
        assert set(raw) == {"training", "unlabeled", "validation", "test"}
        splits[path] = {k: [r["case"] for r in load_datalist(path, k)] for k in raw}  # every file exists
        for k in ("training", "validation", "test"):
            assert all("label" in r for r in load_datalist(path, k))
        assert all("label" not in r for r in load_datalist(path, "unlabeled"))
        assert "MR1003" in splits[path]["unlabeled"]  # no mask -> unlabelled whatever the ratio
        cases = [c for k in raw for c in splits[path][k]]
        assert sorted(cases) == sorted(["MR1001", "MR_1002", "MR1003", "MR1006", "MR1007"])
    half, full = (splits[p] for p in paths)
    assert half["test"] == full["test"] and half["validation"] == full["validation"]
    assert len(half["training"]) == 1 and set(half["training"]) <= set(full["training"])
    assert len(full["training"]) == 2 and full["unlabeled"] == ["MR1003"]

    records = load_datalist(paths[1], "training", image_key="ce")
    assert all(len(r["image"]) == 3 and r["image"][0].endswith("_art.nii.gz") for r in records)
    no_ce = json.loads((out / "dataset.json").read_text())["training"]
    assert "ce" not in next(r for r in no_ce if r["case"] == "MR1003")


def test_find_masks_naming(tmp_path):
    prep = bundle_module(BUNDLE, "prepare_lld_mmri")
    for name in ("A_1_2_T2WI_0000.nii.gz", "A_1_C+V.nii.gz", "A_1_InPhase_0000.nii.gz", "B_T2WI.nii.gz",
                 "C_4_T2WI_0000.nii.gz", "B_2_DWI_0000.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = prep.find_masks(tmp_path, ["A_1", "B"])
    assert {k: v.rsplit("/", 1)[-1] for k, v in found.items()} == {
        ("A_1", "T2WI"): "A_1_2_T2WI_0000.nii.gz", ("A_1", "C+V"): "A_1_C+V.nii.gz",
        ("A_1", "In Phase"): "A_1_InPhase_0000.nii.gz",
        ("B", "T2WI"): "B_T2WI.nii.gz",
        ("B", "DWI"): "B_2_DWI_0000.nii.gz",
    }
    entry = {"pixel_spacing": [0.7, 0.8], "slice_spacing": 0, "slice_thickness": 6.0, "origin": [10, 20, 30]}
    expected = [[-0.7, 0, 0, -10], [0, -0.8, 0, -20], [0, 0, 6, 30], [0, 0, 0, 1]]
    np.testing.assert_allclose(prep.series_affine(entry), expected)  # slice_spacing 0 -> slice_thickness


@pytest.mark.integration
def test_cli_module_and_file(release, tmp_path):
    root, masks = release
    args = ["--root", str(root), "--masks", str(masks), "--label_ratio", "1.0", "--patients", "[MR1001,MR1006,MR1007]"]
    run_cmd([sys.executable, "-m", "scripts.prepare_lld_mmri", *args, "--out_dir", str(tmp_path / "a")],
            cwd=BUNDLES / BUNDLE, timeout=300)
    proc = run_cmd([sys.executable, str(SCRIPT), *args, "--out_dir", str(tmp_path / "b")], cwd=tmp_path, timeout=300)
    assert "summary: 3 converted" in proc.stdout + proc.stderr
    for sub in ("a", "b"):
        split = json.loads((tmp_path / sub / "datalist_100.json").read_text())
        assert len(split["training"]) == 1 and len(split["test"]) == 1 and len(split["validation"]) == 1
