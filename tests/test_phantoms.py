"""Tests of the phantom generators and data lists (scripts/phantoms.py): contract, geometry, anatomy, difficulty."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, run_cmd
from scipy import ndimage

import phantoms

RATIOS = (0.1, 0.2, 0.5, 1.0)
IN_PLANE = np.ones((3, 3, 1), bool)


def _load(folder: Path, rel: str) -> np.ndarray:
    return np.asanyarray(nib.load(folder / rel).dataobj)


def _records(folder: Path) -> list[dict]:
    return json.loads((folder / "dataset.json").read_text())["training"]


def best_window_dice(image: np.ndarray, label: np.ndarray, step: int = 5) -> tuple[float, int, int]:
    """Best Dice of ``a <= image < b`` against ``label`` over all windows on a ``step`` HU grid.

    Thresholds ``image > t`` and ``image < t`` are the windows with ``b`` or ``a`` at the end of the HU range.
    """
    edges = np.arange(-1024, 3072 + 2 * step, step)
    n_all = np.concatenate([[0], np.cumsum(np.histogram(image, edges)[0])])
    n_fg = np.concatenate([[0], np.cumsum(np.histogram(image[label > 0], edges)[0])])
    tp = n_fg[None, :] - n_fg[:, None]  # [a, b]: foreground voxels in [edges[a], edges[b])
    predicted = n_all[None, :] - n_all[:, None]
    dice = np.where(np.triu(np.ones(tp.shape, bool), 1), 2.0 * tp / np.maximum(predicted + label.sum(), 1), 0.0)
    a, b = np.unravel_index(np.argmax(dice), dice.shape)
    return float(dice[a, b]), int(edges[a]), int(edges[b])


def lesion_cnr(image: np.ndarray, lesion: np.ndarray, background: np.ndarray) -> float:
    """RMS contrast-to-noise of a lesion against the surrounding liver: sqrt(E[(I - m)^2] / var - 1), >= 0.

    ``m`` and ``var`` are the mean and variance of ``background``; the measure is 0 for a lesion that looks like
    its background and also captures heterogeneous (rim, nodular) enhancement that a mean difference would miss.
    """
    mean, var = image[background].mean(), image[background].var()
    return float(np.sqrt(max(((image[lesion] - mean) ** 2).mean() / var - 1.0, 0.0)))


# ---------------------------------------------------------------------------------------------------------------
# contract
# ---------------------------------------------------------------------------------------------------------------


def test_liver_contract(liver_data):
    records = _records(liver_data)
    assert [r["case"] for r in records] == [f"liver_{i:03d}" for i in range(8)]
    ds = json.loads((liver_data / "dataset.json").read_text())
    assert ds["numTraining"] == 8 and ds["organs"] == phantoms.LIVER_ORGANS
    for r in records:
        c = r["case"]
        assert r["image"] == [f"imagesTr/{c}_t2w.nii.gz", f"imagesTr/{c}_dwi.nii.gz"]
        assert r["ce"] == [f"imagesTr/{c}_art.nii.gz", f"imagesTr/{c}_pv.nii.gz", f"imagesTr/{c}_delay.nii.gz"]
        assert r["label"] == f"labelsTr/{c}.nii.gz" and r["organs"] == f"organsTr/{c}.nii.gz"
        for rel in r["image"] + r["ce"]:
            img = _load(liver_data, rel)
            assert img.dtype == np.float32 and img.shape == (64, 64, 8) and img.min() >= 0
        label, organs = _load(liver_data, r["label"]), _load(liver_data, r["organs"])
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        assert organs.dtype == np.uint8 and set(np.unique(organs)) == {0, 1, 2, 3, 4}


def test_ct_contract(ct_data):
    records = _records(ct_data)
    assert [r["case"] for r in records] == [f"ct_{i:03d}" for i in range(8)]
    for r in records:
        c = r["case"]
        assert r == {"case": c, "image": f"imagesTr/{c}.nii.gz", "label": f"labelsTr/{c}.nii.gz",
                     "organs": f"organsTr/{c}.nii.gz"}
        img, label, organs = (_load(ct_data, r[k]) for k in ("image", "label", "organs"))
        assert img.dtype == np.int16 and img.shape == (64, 64, 48) and -1024 <= img.min() and img.max() <= 3071
        assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}  # one neoplasm in every case
        assert organs.dtype == np.uint8 and set(np.unique(organs)) == set(range(7))


def test_geometry_round_trips_through_monai(liver_data, ct_data):
    from monai.data import MetaTensor
    from monai.transforms import EnsureChannelFirstd, LoadImage, LoadImaged

    for folder, case, rel, spacing_range in (
        (liver_data, phantoms.liver_case(0, seed=0, size=64, n_slices=8), "imagesTr/liver_000_t2w.nii.gz",
         ((0.7, 0.9), (5.0, 7.0))),
        (ct_data, phantoms.ct_case(0, seed=0, size=64, n_slices=48), "imagesTr/ct_000.nii.gz",
         ((0.6, 1.0), (1.5, 3.0))),
    ):
        img = LoadImage(image_only=True)(str(folder / rel))
        assert isinstance(img, MetaTensor)
        np.testing.assert_allclose(img.affine.numpy(), case["affine"], atol=1e-5)
        spacing = np.diag(case["affine"])[:3]
        np.testing.assert_allclose(img.pixdim.numpy(), spacing, atol=1e-5)
        assert spacing_range[0][0] <= spacing[0] == spacing[1] <= spacing_range[0][1]
        assert spacing_range[1][0] <= spacing[2] <= spacing_range[1][1]
        assert nib.aff2axcodes(case["affine"]) == ("R", "A", "S")
        assert np.all(case["affine"][:3, 3] != 0)
    # a list of sequences loads as channels, on the geometry of the first
    rec = _records(liver_data)[0]
    data = EnsureChannelFirstd(["image"])(LoadImaged(["image"])({"image": [str(liver_data / p) for p in rec["image"]]}))
    assert tuple(data["image"].shape) == (2, 64, 64, 8)


# ---------------------------------------------------------------------------------------------------------------
# anatomy
# ---------------------------------------------------------------------------------------------------------------


def test_liver_lesions_inside_liver(liver_data):
    n_lesion_cases = 0
    for r in _records(liver_data):
        label, organs = _load(liver_data, r["label"]), _load(liver_data, r["organs"])
        assert np.all(organs[label > 0] == 1)
        assert (organs == 1).sum() > 0.05 * organs.size  # a large liver in every case
        n_lesion_cases += bool(label.any())
    assert n_lesion_cases >= 6


def test_liver_anatomy_layout():
    """The liver lies on the patient's right (+x), the spleen on the left, the spine posterior (-y)."""
    case = phantoms.liver_case(3, seed=0, size=64, n_slices=8)
    centroid = {k: np.argwhere(case["organs"] == k).mean(0) for k in (1, 2, 4)}
    assert centroid[1][0] > 32 > centroid[2][0]
    assert centroid[4][1] < 32 and abs(centroid[4][0] - 31.5) < 2


def test_ct_neoplasm_in_mediastinum(ct_data):
    for r in _records(ct_data):
        label, organs = _load(ct_data, r["label"]), _load(ct_data, r["organs"])
        tumour = label > 0
        assert np.all(organs[tumour] == 6)  # mediastinal compartment: never lung, bone, heart, vessel or airway
        assert ndimage.label(tumour)[1] == 1
        # it abuts the heart or a great vessel
        near = ndimage.binary_dilation(tumour, np.ones((3, 3, 3), bool), iterations=2)
        assert np.isin(organs[near], (2, 3)).any()


def test_ct_hounsfield_units(ct_data):
    for r in _records(ct_data)[:3]:
        img, label, organs = (_load(ct_data, r[k]).astype(np.float32) for k in ("image", "label", "organs"))
        core = {k: ndimage.binary_erosion(organs == k, np.ones((3, 3, 3), bool)) for k in range(1, 7)}
        assert -900 < np.median(img[core[1]]) < -780  # lung
        assert 20 < np.median(img[core[2]]) < 60  # heart
        assert 20 < np.median(img[core[3]]) < 60  # great vessels
        assert np.median(img[organs == 4]) > 200  # bone
        assert np.percentile(img[organs == 5], 5) < -900  # air in the airway
        assert -130 < np.median(img[core[6] & (label == 0)]) < -60  # mediastinal fat
        assert 40 < np.median(img[label > 0]) < 100  # soft-tissue neoplasm, denser than heart and vessels


def test_ct_neoplasm_not_threshold_solvable(ct_data):
    """No HU threshold (``> t`` or ``< t``) nor HU window segments the neoplasm: best Dice < 0.5 in every case.

    Measured (seed 0): 40 cases at the default size (96x96x64) 0.07-0.45, the best window being roughly
    [50, 100] HU: the neoplasm with the chest-wall muscle and the noisy edges of the heart and vessels.
    """
    cases = [(_load(ct_data, r["image"]), _load(ct_data, r["label"])) for r in _records(ct_data)]
    cases += [(c["image"], c["label"]) for c in (phantoms.ct_case(i, seed=0) for i in (2, 7))]
    for image, label in cases:
        dice, low, high = best_window_dice(image, label)
        assert dice < 0.5, (dice, low, high)


def _lesion_radii_px(label: np.ndarray, spacing: float, pixdim: float) -> list[float]:
    """Per connected lesion: the radius of a disc of its largest in-plane cross-section, in working pixels."""
    components, n = ndimage.label(label)
    radii = []
    for i in range(1, n + 1):
        area = (components == i).reshape(-1, label.shape[-1]).sum(0).max() * spacing**2
        radii.append(float(np.sqrt(area / np.pi)) / pixdim)
    return radii


def _working_pixdim(bundle: str) -> float:
    """In-plane spacing of the ``cpu`` benchmark profile (``cpu_demo.json`` unless the profile overrides it)."""
    import benchmark_accuracy

    demo = json.loads((Path(phantoms.__file__).parents[1] / "bundles" / bundle / "configs" / "cpu_demo.json")
                      .read_text())
    return float(benchmark_accuracy.PROFILES["cpu"][bundle].train.get("pixdim", demo["pixdim"])[0])


def test_lesions_learnable_at_the_working_resolution():
    """Most lesions are at least 5 pixels in radius at the ``cpu`` benchmark profile's resolution."""
    liver_px, ct_px = _working_pixdim("cdugjl_liver"), _working_pixdim("ceds_mediastinum")
    radii = []
    for i in range(8):
        case = phantoms.liver_case(i, seed=0)
        radii += _lesion_radii_px(case["label"], case["affine"][0, 0], liver_px)
    assert len(radii) >= 5 and np.mean(np.array(radii) >= 5) >= 0.75, np.round(radii, 1)
    radii = []
    for i in range(4):
        case = phantoms.ct_case(i, seed=0)
        radii += _lesion_radii_px(case["label"], case["affine"][0, 0], ct_px)
    assert np.mean(np.array(radii) >= 5) >= 0.75, np.round(radii, 1)


def test_ct_lesion_size_varies():
    sizes = [phantoms.ct_case(i, seed=1, size=48, n_slices=24)["label"].sum() for i in range(6)]
    assert min(sizes) > 0 and max(sizes) > 2 * min(sizes)


# ---------------------------------------------------------------------------------------------------------------
# liver MRI appearance
# ---------------------------------------------------------------------------------------------------------------


def test_liver_lesions_more_conspicuous_in_ce_phases():
    """Per lesion, the best CE phase shows it with several times the contrast-to-noise of T2WI / DWI.

    Measured (seed 0, 64x64x8, 12 cases): median over lesions of the best CE CNR ~9, of the best of T2WI/DWI ~1.8,
    CE better for 91 % of the lesions; at the default size (128x128x20, 24 cases) ~7.8 and ~2.0, CE better for 73 %
    (cysts, fluid in every sequence since ``cyst_like_fluid``, and haemangiomas are the bright ones in T2WI).
    """
    ce, plain = [], []
    for i in range(12):
        case = phantoms.liver_case(i, seed=0, size=64, n_slices=8)
        liver = (case["organs"] == 1) & (case["label"] == 0)
        components, n = ndimage.label(case["label"] > 0)
        for c in range(1, n + 1):
            lesion = components == c
            if lesion.sum() < 10:
                continue
            ring = ndimage.binary_dilation(lesion, IN_PLANE, iterations=4)
            ring &= ~ndimage.binary_dilation(lesion, IN_PLANE) & liver
            cnr = {k: lesion_cnr(v, lesion, ring) for k, v in case["images"].items()}
            ce.append(max(cnr[k] for k in phantoms.LIVER_CE_PHASES))
            plain.append(max(cnr[k] for k in phantoms.LIVER_SEQUENCES))
    ce, plain = np.array(ce), np.array(plain)
    assert len(ce) >= 8
    assert np.median(ce) > 2.5 * np.median(plain)
    assert np.median(plain) < 2.5  # T2WI / DWI show lesions only weakly
    assert np.mean(ce > plain) > 0.8


def test_liver_dwi_misregistration_and_difficulty_knobs():
    base = phantoms.liver_case(1, seed=0, size=48, n_slices=6)
    assert 0 < np.abs(base["dwi_shift"]).max() <= 1.5
    aligned = phantoms.liver_case(1, seed=0, size=48, n_slices=6, misregistration=0.0)
    assert np.all(aligned["dwi_shift"] == 0)
    clean = phantoms.liver_case(1, seed=0, size=48, n_slices=6, noise=0.0)
    np.testing.assert_array_equal(clean["label"], base["label"])
    liver = base["organs"] == 1
    assert clean["images"]["t2w"][liver].std() < base["images"]["t2w"][liver].std()


# ---------------------------------------------------------------------------------------------------------------
# determinism, data lists, command line
# ---------------------------------------------------------------------------------------------------------------


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.nii.gz"))}


@pytest.mark.parametrize("kind", ["liver", "ct"])
def test_same_seed_same_bytes(tmp_path, kind):
    def make(out: Path, seed: int, n_cases: int) -> None:
        if kind == "liver":
            phantoms.liver_mri(str(out), n_cases=n_cases, seed=seed, size=32, n_slices=4)
        else:
            phantoms.mediastinal_ct(str(out), n_cases=n_cases, seed=seed, size=32, n_slices=16)

    make(tmp_path / "a", 0, 2)
    make(tmp_path / "b", 0, 2)
    make(tmp_path / "c", 1, 2)
    make(tmp_path / "d", 0, 1)
    a, b, c, d = (_file_bytes(tmp_path / x) for x in "abcd")
    assert a == b and len(a) == (14 if kind == "liver" else 6)
    assert (tmp_path / "a" / "dataset.json").read_bytes() == (tmp_path / "b" / "dataset.json").read_bytes()
    assert all(a[k] != c[k] for k in a if "imagesTr" in k)
    assert all(d[k] == a[k] for k in d)  # case i does not depend on n_cases


def _split(path: str) -> dict[str, list[dict]]:
    return json.loads(Path(path).read_text())


@pytest.mark.parametrize("n_cases", [8, 24])
def test_datalist_splits(tmp_path, liver_data, n_cases):
    source = json.loads((liver_data / "dataset.json").read_text())
    base = source["training"][0]
    records = [json.loads(json.dumps(base).replace("liver_000", f"liver_{i:03d}")) for i in range(n_cases)]
    (tmp_path / "dataset.json").write_text(json.dumps({**source, "training": records}))
    splits = {}
    for ratio in RATIOS:
        path = phantoms.datalist(str(tmp_path), label_ratio=ratio, seed=0)
        assert Path(path).name == f"datalist_{round(100 * ratio)}.json"
        splits[ratio] = _split(path)
    all_cases = {r["case"] for r in records}
    previous: set[str] = set()
    for ratio, split in splits.items():
        assert set(split) == {"training", "unlabeled", "validation", "test"}
        groups = {k: [r["case"] for r in v] for k, v in split.items()}
        assert sum(len(v) for v in groups.values()) == n_cases and set().union(*groups.values()) == all_cases
        assert split["validation"] == splits[1.0]["validation"] and split["test"] == splits[1.0]["test"]
        assert len(split["training"]) >= 1 and len(split["validation"]) >= 1 and len(split["test"]) >= 1
        assert previous <= set(groups["training"])  # nested labelled subsets
        previous = set(groups["training"])
        for r in split["unlabeled"]:
            assert "label" not in r and "organs" not in r and r["image"] and r["ce"]
        for r in split["training"] + split["validation"] + split["test"]:
            assert "label" in r and "organs" in r
    assert splits[1.0]["unlabeled"] == []
    if n_cases == 24:  # 5 test, 5 validation, 14 in the pool
        assert [len(splits[r]["training"]) for r in RATIOS] == [1, 3, 7, 14]
    other_seed = _split(phantoms.datalist(str(tmp_path), label_ratio=1.0, seed=1))
    assert other_seed["test"] != splits[1.0]["test"]


def test_datalist_resolves_with_monai(liver_data, ct_data):
    from monai.data import load_decathlon_datalist

    for folder in (liver_data, ct_data):
        for key in ("training", "validation", "test"):
            for item in load_decathlon_datalist(str(folder / "datalist_20.json"), data_list_key=key):
                for path in np.atleast_1d(item["image"]).tolist() + [item["label"]]:
                    assert Path(path).is_absolute() and Path(path).exists()
        assert len(load_decathlon_datalist(str(folder / "datalist_20.json"), True, "unlabeled")) == 3


def test_datalist_rejects_bad_input(tmp_path, ct_data):
    with pytest.raises(ValueError):
        phantoms.datalist(str(ct_data), label_ratio=0.0)
    shutil.copy(ct_data / "dataset.json", tmp_path / "dataset.json")
    data = json.loads((tmp_path / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**data, "training": data["training"][:2]}))
    with pytest.raises(ValueError):
        phantoms.datalist(str(tmp_path), label_ratio=1.0)


def test_cli(tmp_path):
    script = str(REPO / "scripts" / "phantoms.py")
    for command, args in (("liver_mri", ["--size", "32", "--n_slices", "4"]),
                          ("mediastinal_ct", ["--size", "32", "--n_slices", "16", "--tumour_hu", "[35,45]"])):
        out = tmp_path / command
        proc = run_cmd([sys.executable, script, command, "--out_dir", str(out), "--n_cases", "5", "--seed", "3",
                        *args], cwd=tmp_path, timeout=120)
        assert "5 cases" in proc.stdout and (out / "dataset.json").exists()
        proc = run_cmd([sys.executable, script, "datalist", "--data_dir", str(out), "--label_ratio", "0.1"],
                       cwd=tmp_path, timeout=120)
        split = _split(str(out / "datalist_10.json"))
        assert len(split["training"]) == 1 and len(split["unlabeled"]) == 2
    generator = json.loads((tmp_path / "mediastinal_ct" / "dataset.json").read_text())["generator"]
    assert generator["tumour_hu"] == [35, 45] and generator["seed"] == 3


def test_liver_mimics_are_t2_bright_background_and_optional():
    """Mimics: label 0, in the liver, brighter than it in T2WI only; ``max_mimics=0`` leaves the case unchanged."""
    plain = phantoms.liver_case(3, seed=0, size=64, n_slices=8)
    case = phantoms.liver_case(3, seed=0, size=64, n_slices=8, max_mimics=3)
    assert plain["mimic_masks"] == [] and np.array_equal(plain["label"], case["label"])
    found = 0
    for i in range(6):
        case = phantoms.liver_case(i, seed=0, n_slices=8, max_mimics=3)
        liver = (case["organs"] == 1) & (case["label"] == 0) & ~np.any([np.zeros_like(case["label"], bool),
                                                                        *case["mimic_masks"]], axis=0)
        for mask in case["mimic_masks"]:
            found += 1
            assert not (case["label"][mask]).any() and np.all(case["organs"][mask] == 1)
            ratio = {k: np.median(case["images"][k][mask]) / np.median(case["images"][k][liver])
                     for k in case["images"]}
            assert ratio["t2w"] > 1.1 and all(0.85 < ratio[k] < 1.15 for k in ("dwi", "art", "pv", "delay")), ratio
    assert found >= 3


def test_liver_mimic_types():
    """Each mimic kind has its own T2WI / DWI appearance and none differs from the liver in the CE phases; one kind
    draws as before the kinds existed."""
    medians: dict[str, list] = {}
    for i in range(12):
        case = phantoms.liver_case(i, seed=0, n_slices=8, max_mimics=3, mimic_types=list(phantoms.MIMIC_TYPES))
        liver = (case["organs"] == 1) & (case["label"] == 0) & ~np.any([np.zeros_like(case["label"], bool),
                                                                        *case["mimic_masks"]], axis=0)
        for mask, kind in zip(case["mimic_masks"], case["mimics"]):
            assert not case["label"][mask].any()
            ratio = {k: np.median(case["images"][k][mask]) / np.median(case["images"][k][liver])
                     for k in case["images"]}
            assert all(0.85 < ratio[k] < 1.15 for k in ("art", "pv", "delay")), (kind, ratio)
            medians.setdefault(kind, []).append((ratio["t2w"], ratio["dwi"]))
    assert set(medians) == set(phantoms.MIMIC_TYPES)
    t2, dwi = ({k: np.mean([v[j] for v in vals]) for k, vals in medians.items()} for j in (0, 1))
    assert t2["t2_bright"] > 1.1 and abs(dwi["t2_bright"] - 1) < 0.1  # bright in T2WI only
    assert t2["scar"] > 1.05 and dwi["scar"] > 1.05  # like an HCC in both
    assert t2["siderotic"] < 0.92 and dwi["siderotic"] < 0.97  # dark in both
    one = phantoms.liver_case(4, seed=0, size=64, n_slices=8, max_mimics=3)
    again = phantoms.liver_case(4, seed=0, size=64, n_slices=8, max_mimics=3, mimic_types=["t2_bright"])
    assert all(np.array_equal(one["images"][k], again["images"][k]) for k in one["images"])


def test_liver_lesion_types_selectable():
    kinds = set()
    for i in range(12):
        kinds |= set(phantoms.liver_case(i, seed=0, size=48, n_slices=6, max_lesions=3,
                                         lesion_types=("t2_dark", "dwi_only"))["lesions"])
    assert kinds == {"t2_dark", "dwi_only"}


def test_liver_appearance_modes():
    """With ``appearance_modes``, lesions (cysts aside) take their T2WI / DWI contrast along the even directions of
    the contrast plane and mimics along the odd ones, the first mode of each class the most frequent, the CE phases
    unchanged; shapes and places are those without it."""
    n = 4
    modes: dict[str, list[int]] = {"lesion": [], "mimic": []}
    for i in range(12):
        case = phantoms.liver_case(i, seed=0, n_slices=8, max_mimics=3, appearance_modes=n, noise=0.0,
                                   misregistration=0.0)
        plain = phantoms.liver_case(i, seed=0, n_slices=8, max_mimics=3, noise=0.0, misregistration=0.0)
        assert np.array_equal(case["label"], plain["label"])
        assert all(np.array_equal(a, b) for a, b in zip(case["mimic_masks"], plain["mimic_masks"]))
        assert all(np.array_equal(case["images"][k], plain["images"][k]) for k in ("art", "pv", "delay"))
        liver = (case["organs"] == 1) & (case["label"] == 0) & ~np.any([np.zeros_like(case["label"], bool),
                                                                        *case["mimic_masks"]], axis=0)
        foci = [("lesion", m) for m, kind in zip(case["lesion_masks"], case["lesions"]) if kind != "cyst"]
        for kind, mask in foci + [("mimic", m) for m in case["mimic_masks"]]:
            inner = ndimage.binary_erosion(mask, np.ones((5, 5, 1), bool))
            if inner.sum() < 20:
                continue
            t2, dwi = (np.log(np.median(case["images"][k][inner]) / np.median(case["images"][k][liver]))
                       for k in ("t2w", "dwi"))
            angle = np.arctan2(dwi / 0.35, t2 / 0.25) % (2 * np.pi)  # in the default contrasts' units
            modes[kind].append(int(angle / (np.pi / n)))  # direction k sits at (k + 0.5) pi / n
    assert len(modes["lesion"]) >= 6 and len(modes["mimic"]) >= 6, modes
    assert {k % 2 for k in modes["lesion"]} == {0} and {k % 2 for k in modes["mimic"]} == {1}, modes
    assert modes["lesion"].count(0) > modes["lesion"].count(6) and modes["mimic"].count(1) > modes["mimic"].count(7)


def test_appearance_modes_by_split(tmp_path):
    """Every lesion and mimic of every split is counted once, under its mode (cysts as fluid)."""
    phantoms.liver_mri(str(tmp_path), n_cases=6, size=48, n_slices=6, max_mimics=3, appearance_modes=4)
    path = phantoms.datalist(str(tmp_path), label_ratio=0.5, test_fraction=0.34, val_fraction=0.17)
    got = phantoms.appearance_modes_by_split(path)
    split = json.loads(Path(path).read_text())
    assert set(got) == set(split)
    for name, records in split.items():
        cases = [phantoms.liver_case(int(r["case"][-3:]), seed=0, size=48, n_slices=6, max_mimics=3,
                                     appearance_modes=4) for r in records]
        assert sum(got[name]["lesions"].values()) == sum(len(c["lesions"]) for c in cases)
        assert sum(got[name]["mimics"].values()) == sum(len(c["mimic_masks"]) for c in cases)
        assert got[name]["lesions"].get("fluid", 0) == sum(c["lesions"].count("cyst") for c in cases)
        assert set(got[name]["mimics"]) <= {"0", "1", "2", "3"}
