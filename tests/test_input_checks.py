"""Bad inputs are refused with an error naming the file and the problem, before any voxel is used for compute."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import input_checks as ic
from conftest import bundle_module
from input_checks import InputError

CASE_NAME = bundle_module("cdugjl_liver", "case_meta").case_name


def load_cases(inputs, **kwargs):
    return ic.load_cases(inputs, CASE_NAME, **kwargs)

SPACING = (0.8, 0.8, 2.0)


def _affine(spacing=SPACING, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = shift
    return affine


def _image(shape=(16, 16, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, _affine() if affine is None else affine), str(path))
    return path


def _patch_pixdim(path: Path, axis: int, value: float) -> Path:
    """Write ``value`` into the header's ``pixdim[axis]`` of an uncompressed ``.nii`` (as a broken exporter would)."""
    raw = bytearray(path.read_bytes())
    raw[76 + 4 * axis: 80 + 4 * axis] = np.float32(value).tobytes()
    path.write_bytes(bytes(raw))
    return path


def _expect(path, match: str, call, *args, **kwargs) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        call(*args, **kwargs)
    assert info.value.path == os.fspath(path)
    assert os.fspath(path) in str(info.value)
    return info.value


def test_valid_image_and_label_pass(tmp_path):
    image = _write(tmp_path / "ct.nii.gz", _image())
    label = _write(tmp_path / "ct_label.nii.gz", (_image() > 1).astype(np.uint8))
    infos = ic.check_case({"image": str(image), "label": str(label)})
    assert infos[0].spatial_shape == (16, 16, 8)
    assert np.allclose(infos[0].spacing, SPACING)


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.nii.gz", "file not found", ic.check_image, tmp_path / "nope.nii.gz")


def test_truncated_gzip(tmp_path):
    good = _write(tmp_path / "good.nii.gz", _image((32, 32, 16)))
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    ic.check_header(bad)  # the header is intact: only streaming the voxels finds the cut
    _expect(bad, "truncated", ic.check_image, bad)


def test_truncated_uncompressed_found_from_header(tmp_path):
    good = _write(tmp_path / "good.nii", _image())
    bad = tmp_path / "cut.nii"
    bad.write_bytes(good.read_bytes()[:-100])
    _expect(bad, "truncated", ic.check_header, bad)


def test_corrupt_gzip_stream(tmp_path):
    good = _write(tmp_path / "good.nii.gz", _image((32, 32, 16)))
    raw = bytearray(good.read_bytes())
    middle = len(raw) // 2
    raw[middle: middle + 64] = bytes(64)  # damaged deflate blocks (CRC and stream no longer agree)
    bad = tmp_path / "damaged.nii.gz"
    bad.write_bytes(bytes(raw))
    _expect(bad, "corrupt", ic.check_image, bad)


def test_not_a_nifti(tmp_path):
    bad = tmp_path / "notes.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not an image" * 10))
    _expect(bad, "corrupt or unreadable NIfTI header", ic.check_header, bad)
    text = tmp_path / "notes.txt"
    text.write_text("x")
    _expect(text, "not a NIfTI file", ic.check_header, text)


def test_not_3d(tmp_path):
    flat = _write(tmp_path / "slice.nii.gz", _image((16, 16)))
    _expect(flat, "expected a 3D image", ic.check_header, flat)
    series = _write(tmp_path / "series.nii.gz", _image((16, 16, 8, 5)))
    _expect(series, "expected a 3D image", ic.check_header, series)


def test_wrong_number_of_channels_in_4d_file(tmp_path):
    three = _write(tmp_path / "mri.nii.gz", _image((16, 16, 8, 3)))
    _expect(three, "expected 2 channels", ic.check_case, {"image": str(three)}, modalities=2)
    two = _write(tmp_path / "mri2.nii.gz", _image((16, 16, 8, 2)))
    assert ic.check_case({"image": str(two)}, modalities=2)[0].channels == 2


def test_single_3d_file_for_two_modalities(tmp_path):
    t2w = _write(tmp_path / "a_t2w.nii.gz", _image())
    _expect(t2w, "must be 4D with 2 channels", ic.check_case, {"image": str(t2w)}, modalities=2)


def test_wrong_number_of_modalities(tmp_path):
    files = [str(_write(tmp_path / f"a_{m}.nii.gz", _image(seed=i))) for i, m in enumerate(("t2w", "dwi", "art"))]
    _expect(files[0], "3 image files given, the model expects 2", ic.check_case, {"image": files}, modalities=2)
    _expect(files[0], "2 image files given, the model expects 1", ic.check_case, {"image": files[:2]}, modalities=1)


def test_modalities_with_different_field_of_view(tmp_path):
    t2w = _write(tmp_path / "a_t2w.nii.gz", _image())
    far = _write(tmp_path / "a_dwi.nii.gz", _image(seed=1), _affine(shift=(0.0, 0.0, 120.0)))
    _expect(far, "field of view", ic.check_case, {"image": [str(t2w), str(far)]}, modalities=2)
    zoomed = _write(tmp_path / "b_dwi.nii.gz", _image(seed=1), _affine(spacing=(1.6, 1.6, 4.0)))
    _expect(zoomed, "cannot belong to the same case", ic.check_case, {"image": [str(t2w), str(zoomed)]}, modalities=2)
    near = _write(tmp_path / "c_dwi.nii.gz", _image(seed=1), _affine(shift=(1.5, -1.0, 0.5)))  # slight misregistration
    ic.check_case({"image": [str(t2w), str(near)]}, modalities=2)


def test_modalities_with_different_grids(tmp_path):
    t2w = _write(tmp_path / "a_t2w.nii.gz", _image())
    other = _write(tmp_path / "a_dwi.nii.gz", _image((16, 16, 9)))
    _expect(other, "must share the voxel grid", ic.check_case, {"image": [str(t2w), str(other)]}, modalities=2)


@pytest.mark.parametrize("value,kind", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_voxels(tmp_path, value, kind):
    data = _image()
    data[3, 4, 5] = value
    bad = _write(tmp_path / "bad.nii.gz", data)
    err = _expect(bad, f"1 {kind} voxel", ic.check_image, bad)
    assert "slices" in err.problem


def test_all_constant_image(tmp_path):
    flat = _write(tmp_path / "flat.nii.gz", np.full((16, 16, 8), -1000, np.int16))
    _expect(flat, "all voxels have the same value", ic.check_image, flat)


@pytest.mark.parametrize("values", [(0, 2), (0, 255), (0.0, 0.5)])
def test_label_values_outside_0_1(tmp_path, values):
    image = _write(tmp_path / "img.nii.gz", _image())
    data = np.zeros((16, 16, 8), np.float32 if isinstance(values[1], float) else np.uint8)
    data[4:8, 4:8, 2:4] = values[1]
    label = _write(tmp_path / "lab.nii.gz", data)
    _expect(label, "label values must be 0 or 1", ic.check_case, {"image": str(image), "label": str(label)})


def test_label_with_many_values(tmp_path):
    image = _write(tmp_path / "img.nii.gz", _image())
    label = _write(tmp_path / "lab.nii.gz", _image(seed=3))
    _expect(label, "more than 16 values", ic.check_case, {"image": str(image), "label": str(label)})


def test_label_shape_disagrees(tmp_path):
    image = _write(tmp_path / "img.nii.gz", _image())
    label = _write(tmp_path / "lab.nii.gz", np.zeros((16, 16, 7), np.uint8))
    _expect(label, r"label shape \(16, 16, 7\) differs", ic.check_case, {"image": str(image), "label": str(label)})


def test_label_affine_disagrees(tmp_path):
    image = _write(tmp_path / "img.nii.gz", _image())
    label = _write(tmp_path / "lab.nii.gz", np.zeros((16, 16, 8), np.uint8), _affine(shift=(0.0, 5.0, 0.0)))
    _expect(label, "label affine differs", ic.check_case, {"image": str(image), "label": str(label)})


@pytest.mark.parametrize("value", [0.0, -0.8, np.nan])
def test_zero_negative_or_nan_spacing(tmp_path, value):
    bad = _patch_pixdim(_write(tmp_path / "img.nii", _image()), 2, value)
    _expect(bad, "spacing must be finite and positive", ic.check_header, bad)


def test_singular_affine(tmp_path):
    affine = _affine()
    affine[:3, 2] = 0.0  # the slice axis maps nowhere (an sform only; nibabel cannot even write it as a qform)
    header = nib.Nifti1Header()
    header.set_sform(affine, code=2)
    bad = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(_image(), None, header), str(bad))
    _expect(bad, "the affine is singular", ic.check_header, bad)
    affine[:3, 2] = [0.0, 0.0, np.nan]
    header.set_sform(affine, code=2)
    nib.save(nib.Nifti1Image(_image(), None, header), str(bad))
    _expect(bad, "the affine holds NaN or Inf", ic.check_header, bad)


def test_large_volume_header_accepted_without_reading_voxels(tmp_path, monkeypatch):
    """A 512 x 512 x 300 CT (150 MiB of int16) passes the header checks reading only the header."""
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 300))
    header.set_data_dtype(np.int16)
    header.set_zooms((0.7, 0.7, 1.0))
    header.set_sform(np.diag([0.7, 0.7, 1.0, 1.0]), code=1)
    header.set_qform(np.diag([0.7, 0.7, 1.0, 1.0]), code=1)
    path = tmp_path / "big.nii"
    with open(path, "wb") as f:
        header.write_to(f)
        f.write(b"\x00" * (352 - f.tell()))
        f.truncate(352 + 512 * 512 * 300 * 2)  # sparse: no disk space used, no voxel written
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", lambda *a, **k: pytest.fail("voxels read"))
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__getitem__", lambda *a, **k: pytest.fail("voxels read"))
    info = ic.check_header(path)
    assert info.spatial_shape == (512, 512, 300)
    assert np.allclose(info.spacing, (0.7, 0.7, 1.0))


def test_voxel_scan_streams_in_bounded_memory(tmp_path):
    """Streaming a 16 MiB float32 volume holds at most one slab (here 1 MiB), not the volume."""
    data = np.random.default_rng(0).normal(size=(256, 256, 64)).astype(np.float32)
    path = _write(tmp_path / "vol.nii.gz", data)
    volume_bytes = data.nbytes
    del data
    tracemalloc.start()
    stats = ic.scan_voxels(path, max_slab_bytes=2**20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert stats.minimum < stats.maximum
    assert peak < volume_bytes / 4, f"peak {peak / 2**20:.1f} MiB streaming a {volume_bytes / 2**20:.0f} MiB volume"


def _write_cases(folder: Path, names) -> list[str]:
    folder.mkdir(exist_ok=True)
    return [str(_write(folder / f"{n}.nii.gz", _image(seed=i))) for i, n in enumerate(names)]


def test_empty_datalist_folder_and_csv(tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "test": []}))
    _expect(datalist, "no cases found", load_cases, datalist)
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", "no cases found", load_cases, tmp_path / "empty")
    table = tmp_path / "cases.csv"
    table.write_text("case,image\n")
    _expect(table, "no cases found", load_cases, table)


def test_datalist_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{'test': [")
    _expect(broken, "not valid JSON", load_cases, broken)
    nosplit = tmp_path / "nosplit.json"
    nosplit.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    _expect(nosplit, "no 'test' list", load_cases, nosplit)
    noimage = tmp_path / "noimage.json"
    noimage.write_text(json.dumps({"test": [{"label": "a.nii.gz"}]}))
    _expect(noimage, "has no 'image'", load_cases, noimage)
    _expect(tmp_path / "missing.json", "not found", load_cases, tmp_path / "missing.json")


def test_duplicate_case_ids(tmp_path):
    _write_cases(tmp_path / "a", ["ct_000"])
    _write_cases(tmp_path / "b", ["ct_000"])
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": "a/ct_000.nii.gz"}, {"image": "b/ct_000.nii.gz"}]}))
    _expect(datalist, "duplicate case id 'ct_000'", load_cases, datalist)
    table = tmp_path / "cases.csv"
    table.write_text("case,image\nx,a/ct_000.nii.gz\nx,b/ct_000.nii.gz\n")
    _expect(table, "duplicate case id 'x'", load_cases, table)


def test_case_sources(tmp_path):
    """Folder (multi-modal grouping by suffix and 4D files), CSV (';' between modalities) and datalist records."""
    data = tmp_path / "data"
    _write_cases(data, ["p1_t2w", "p1_dwi", "p2_t2w", "p2_dwi"])
    _write(data / "p3.nii.gz", _image((16, 16, 8, 2)))
    records = load_cases(data, modality_suffixes=("_t2w", "_dwi"))
    assert [r["case"] for r in records] == ["p1", "p2", "p3"]
    assert records[0]["image"] == [str(data / "p1_t2w.nii.gz"), str(data / "p1_dwi.nii.gz")]
    table = tmp_path / "cases.csv"
    table.write_text("case,image\nfirst,data/p1_t2w.nii.gz;data/p1_dwi.nii.gz\n")
    assert load_cases(table)[0]["image"][1] == str(data / "p1_dwi.nii.gz")
    table.write_text("path\ndata/p1_t2w.nii.gz\n")
    _expect(table, "needs an 'image' column", load_cases, table)
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps([{"image": ["data/p2_t2w.nii.gz", "data/p2_dwi.nii.gz"]}]))
    assert load_cases(datalist, modality_suffixes=("_t2w",))[0]["case"] == "p2"


@pytest.mark.parametrize("bundle", ["ceds_mediastinum", "cdugjl_liver"])
def test_modality_plausibility(bundle, tmp_path):
    """A CT in HU has air; an MR magnitude is never near -1000. Each is refused by a model of the other modality,
    with the bundle's own rule (``scripts/modality.py``), on the streamed pass."""
    rule = bundle_module(bundle, "modality")
    ct = np.full((16, 16, 8), -1000.0, np.float32)  # air around a body of soft tissue and bone
    ct[4:12, 4:12] = np.random.default_rng(0).normal(40.0, 20.0, (8, 8, 8))
    ct[7:9, 7:9] = 700.0
    mr = np.abs(np.random.default_rng(1).normal(300.0, 100.0, (16, 16, 8))).astype(np.float32)
    ct_path, mr_path = _write(tmp_path / "ct.nii.gz", ct), _write(tmp_path / "mr.nii.gz", mr)
    assert ic.scan_voxels(ct_path, air_below=rule.AIR_HU).air_fraction == pytest.approx(1 - 8 * 8 * 8 / ct.size)
    assert ic.scan_voxels(mr_path, air_below=rule.AIR_HU).air_fraction == 0.0
    ic.check_image(ct_path, modality="CT", rule=rule)
    ic.check_image(mr_path, modality="MR", rule=rule)
    _expect(ct_path, "looks like a CT in Hounsfield units, not an MR: 75 %", ic.check_image, ct_path, modality="MR",
            rule=rule)
    _expect(mr_path, "does not look like a CT in Hounsfield units: no voxel below -500", ic.check_image, mr_path,
            modality="CT", rule=rule)
    ic.check_image(mr_path, modality="PT", rule=rule)  # other modalities are not checked
    # the streamed fraction follows the NIfTI intensity scaling (scl_slope / scl_inter)
    scaled = nib.Nifti1Image(((ct + 1024) / 2).astype(np.int16), _affine())
    scaled.header.set_slope_inter(2.0, -1024.0)
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    assert ic.scan_voxels(tmp_path / "scaled.nii.gz", air_below=rule.AIR_HU).air_fraction == pytest.approx(0.75)
    # the same rule inside the bundle's inference preprocessing, right after loading: the file is named
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    load = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])
    rule.ModalityCheckd("image", "CT")(load({"image": str(ct_path)}))
    rule.ModalityCheckd("image", "MR")(load({"image": str(mr_path)}))
    with pytest.raises(ValueError, match=f"^{ct_path}: looks like a CT in Hounsfield units, not an MR: 75 %"):
        rule.ModalityCheckd("image", "MR")(load({"image": str(ct_path)}))
    with pytest.raises(ValueError, match=f"^{mr_path}: does not look like a CT in Hounsfield units"):
        rule.ModalityCheckd("image", "CT")(load({"image": str(mr_path)}))
    # two modalities loaded from one file each (the liver's T2WI + DWI): the offending channel is named
    both = load({"image": [str(mr_path), str(ct_path)]})
    assert both["image"].shape[0] == 2
    with pytest.raises(ValueError, match=rf"^{mr_path}, channel 1 \(DWI\): looks like a CT"):
        rule.ModalityCheckd("image", "MR", channel_names=["T2WI", "DWI"])(both)
