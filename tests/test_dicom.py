"""DICOM series input and DICOM outputs: ``scripts/dicom_io.py`` writes a phantom as a series, each bundle's
``inference.json`` reads a series folder (one per MR sequence) and gives the result it gives for the same volume as
NIfTI, plus the mask as a DICOM Segmentation and the doubt map as a Parametric Map (``scripts/dicom_seg.py``) and,
for the liver, the quantification report as a DICOM SR (``scripts/dicom_sr.py``);
``scripts/dicom_series.py`` refuses a folder that would not read as one volume, naming the folder and the series."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import dicom_io
from bundle_imports import bundle_module, use_bundle
from conftest import BUNDLES

pydicom = pytest.importorskip("pydicom")

CT, LIVER = "ceds_mediastinum", "cdugjl_liver"


def _volume(shape=(8, 10, 6), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A small integer volume and an oblique RAS affine (rotated in-plane, 2.5 mm slices)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, size=shape).astype(np.float32)
    angle = 0.3
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine[:3, :3] = affine[:3, :3] @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-20.0, 15.0, -40.0]
    return array, affine


def test_series_reads_back_as_the_volume_and_affine(tmp_path):
    """What MONAI's reader makes of a written series: the same array and affine (also with slices stored from the
    top down)."""
    from monai.transforms import LoadImage

    array, affine = _volume()
    flipped = affine.copy()
    flipped[:3, 2] *= -1  # slice k + 1 lies below slice k
    for name, a in (("up", affine), ("down", flipped)):
        dicom_io.write_series(array, a, tmp_path / name, "CT", "test")
        image = LoadImage(image_only=True)(str(tmp_path / name))
        np.testing.assert_array_equal(np.asarray(image), array)
        np.testing.assert_allclose(np.asarray(image.affine), a, atol=1e-4)
    mr = array * 0.37 + 12.1
    dicom_io.write_series(mr, affine, tmp_path / "mr", "MR")
    np.testing.assert_allclose(np.asarray(LoadImage(image_only=True)(str(tmp_path / "mr"))), dicom_io.quantised(mr),
                               atol=1e-5)
    assert np.abs(dicom_io.quantised(mr) - mr).max() < 0.01


def _problem(folder: Path, modality: str | None = "CT") -> str:
    checks = bundle_module(CT, "dicom_series")
    with pytest.raises(checks.DicomSeriesError) as info:
        checks.check_series(folder, modality)
    return str(info.value)


def test_check_series_names_the_folder_series_and_problem(tmp_path):
    checks = bundle_module(CT, "dicom_series")
    array, affine = _volume()
    good = tmp_path / "good"
    uids = dicom_io.write_series(array, affine, good, "CT", "chest")
    info = checks.check_series(good, "CT")
    assert (info["series_uid"] == uids["series"] and info["slices"] == 6
            and info["spacing"] == pytest.approx(2.5, abs=1e-4))

    assert f"{good} (series 'chest' ({uids['series']})): modality CT; this model expects MR" in _problem(good, "MR")

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "slice_0003.dcm").unlink()
    assert "1 missing slice(s) between" in _problem(missing) and str(missing) in _problem(missing)

    uneven = tmp_path / "uneven"
    stretched = affine.copy()
    dicom_io.write_series(array[..., :3], stretched, uneven, "CT", "chest")
    stretched[:3, 3] += stretched[:3, 2] * 3.4  # the next three slices start 3.4 slices on: a gap of 1.4 slices
    dicom_io.write_series(array[..., 3:], stretched, tmp_path / "upper", "CT", "chest")
    for f in (tmp_path / "upper").iterdir():  # same series, continued instance numbers
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = pydicom.dcmread(next(uneven.iterdir())).SeriesInstanceUID
        ds.InstanceNumber += 3
        ds.save_as(uneven / f"upper_{f.name}")
    assert "uneven slice spacing" in _problem(uneven)

    two = tmp_path / "two"
    shutil.copytree(good, two)
    other = dicom_io.write_series(array, affine, tmp_path / "other", "CT", "abdomen")
    for f in (tmp_path / "other").iterdir():
        shutil.copy(f, two / f"other_{f.name}")
    message = _problem(two)
    assert f"{two}: holds 2 series" in message and other["series"] in message and "'abdomen'" in message

    mixed = tmp_path / "mixed"
    shutil.copytree(good, mixed)
    ds = pydicom.dcmread(mixed / "slice_0002.dcm")
    ds.Modality = "MR"
    ds.save_as(mixed / "slice_0002.dcm")
    assert "mixed modalities ['CT', 'MR']" in _problem(mixed)

    shuffled = tmp_path / "shuffled"
    shutil.copytree(good, shuffled)
    for name, number in (("slice_0001.dcm", 5), ("slice_0004.dcm", 2)):
        ds = pydicom.dcmread(shuffled / name)
        ds.InstanceNumber = number
        ds.save_as(shuffled / name)
    assert "instance numbers do not follow the slice positions" in _problem(shuffled)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    assert f"{empty}: holds no DICOM file" in _problem(empty)


def test_sequences_of_one_input_must_share_geometry(tmp_path):
    checks = bundle_module(LIVER, "dicom_series")
    array, affine = _volume()
    dicom_io.write_series(array + 1000, affine, tmp_path / "t2w", "MR", "T2WI")
    shifted = affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 1.0]
    dicom_io.write_series(array + 1000, shifted, tmp_path / "dwi", "MR", "DWI")
    check = checks.DicomSeriesCheckd("image", modality="MR")
    with pytest.raises(checks.DicomSeriesError, match="'DWI'.*'T2WI'.*share their slice geometry"):
        check({"image": [str(tmp_path / "t2w"), str(tmp_path / "dwi")]})
    dicom_io.write_series(array + 1000, affine, tmp_path / "dwi_ok", "MR", "DWI")
    files = {"image": [str(tmp_path / "t2w"), str(tmp_path / "dwi_ok")]}
    assert check(files) == files
    assert check({"image": "volume.nii.gz"}) == {"image": "volume.nii.gz"}  # files are not its business


def _run_inference(bundle: str, image: str | list[str], checkpoint: Path, out: Path) -> Path:
    """Run the bundle's ``inference.json`` (cpu_demo widths) on one input; returns the case's output folder."""
    from monai.bundle import ConfigWorkflow

    root = BUNDLES / bundle
    workflow = ConfigWorkflow(config_file=[str(root / "configs" / "inference.json"),
                                           str(root / "configs" / "cpu_demo.json")],
                              meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                              workflow_type="infer", bundle_root=str(root), output_dir=str(out),
                              data=[{"image": image}], checkpoint=str(checkpoint), device="cpu")
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


@pytest.mark.integration
@pytest.mark.parametrize("bundle", [CT, LIVER])
def test_inference_on_a_series_equals_inference_on_nifti(bundle, ct_data, liver_data, tmp_path):
    """A phantom case as NIfTI and as DICOM series (the liver's T2WI and DWI as two series of one study): the same
    mask, the same output affine, the same doubt map to float rounding."""
    from monai.bundle import ConfigParser

    data, case = (ct_data, "ct_000") if bundle == CT else (liver_data, "liver_000")
    root = BUNDLES / bundle
    use_bundle(root)
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "inference.json"), str(root / "configs" / "cpu_demo.json")])
    parser["bundle_root"] = str(root)
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), checkpoint)

    sources = ([data / "imagesTr" / f"{case}.nii.gz"] if bundle == CT else
               [data / "imagesTr" / f"{case}_{s}.nii.gz" for s in ("t2w", "dwi")])
    modality = "CT" if bundle == CT else "MR"
    niftis, series = [], []
    study = pydicom.uid.generate_uid()
    for n, source in enumerate(sources):
        image = nib.load(source)
        values = dicom_io.quantised(np.asarray(image.dataobj, dtype=np.float32))  # what the series holds
        niftis.append(tmp_path / "nifti" / source.name)
        niftis[-1].parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(values, image.affine), niftis[-1])
        series.append(tmp_path / "dicom" / source.name.split(".")[0])
        dicom_io.write_series(values, image.affine, series[-1], modality, source.name, study_uid=study,
                              series_number=n + 1)
    as_input = (lambda paths: str(paths[0])) if bundle == CT else (lambda paths: [str(p) for p in paths])
    from_nifti = _run_inference(bundle, as_input(niftis), checkpoint, tmp_path / "out_nifti")
    from_dicom = _run_inference(bundle, as_input(series), checkpoint, tmp_path / "out_dicom")

    doubt = "confidence" if bundle == CT else "uncertainty"
    for output in ("seg", doubt):
        a = nib.load(next(from_nifti.glob(f"*_{output}.nii.gz")))
        b = nib.load(next(from_dicom.glob(f"*_{output}.nii.gz")))
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
        if output == "seg":
            np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))
        else:
            np.testing.assert_allclose(np.asarray(b.dataobj), np.asarray(a.dataobj), atol=1e-4)
    assert not list(from_nifti.glob("*.dcm"))  # DICOM objects only for DICOM inputs

    # the Segmentation and the Parametric Map, read back: frame k is slice k of the first sequence's series
    import highdicom as hd

    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(series[0].iterdir())]
    source.sort(key=lambda ds: int(ds.InstanceNumber))
    mask = np.asarray(nib.load(next(from_dicom.glob("*_seg.nii.gz"))).dataobj)
    seg = hd.seg.segread(next(from_dicom.glob("*_dicom_seg.dcm")))
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert seg.SegmentSequence[0].SegmentLabel == meta["network_data_format"]["outputs"]["pred"]["channel_def"]["1"]
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID and seg.SoftwareVersions == meta["version"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    frames = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in source], segment_numbers=[1])
    np.testing.assert_array_equal(frames[..., 0], mask.transpose(2, 1, 0))
    pmap = pydicom.dcmread(next(from_dicom.glob(f"*_dicom_{doubt}.dcm")))
    slice_of = {ds.SOPInstanceUID: k for k, ds in enumerate(source)}
    referenced = [slice_of[f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
                  for f in pmap.PerFrameFunctionalGroupsSequence]  # highdicom orders frames by position
    assert sorted(referenced) == list(range(len(source)))
    values = np.asarray(nib.load(next(from_dicom.glob(f"*_{doubt}.nii.gz"))).dataobj)
    np.testing.assert_allclose(pmap.pixel_array, values.transpose(2, 1, 0)[referenced], atol=1e-6)
    if bundle == LIVER:  # the quantification report as an SR: one group per slice the network calls tumour
        sr = hd.sr.srread(next(from_dicom.glob("*_dicom_sr.dcm")))
        report = json.loads(next(from_dicom.glob("*_quantification.json")).read_text())
        said = [e for e in report["slices"] if e.get("network", {}).get("tumour")]
        assert len(sr.content.get_planar_roi_measurement_groups()) == len(said)
        assert len(sr.content.get_image_measurement_groups()) == len(report["lesions"])
        assert sr.StudyInstanceUID == source[0].StudyInstanceUID


def test_series_header_is_the_geometry_the_reader_stacks(tmp_path):
    """``input_checks.series_header`` (headers only) gives the shape and affine of MONAI's read volume."""
    from monai.transforms import LoadImage

    import input_checks

    series = bundle_module(CT, "dicom_series")
    array, affine = _volume()
    flipped = affine.copy()
    flipped[:3, 2] *= -1
    for name, a in (("up", affine), ("down", flipped)):
        dicom_io.write_series(array, a, tmp_path / name, "CT")
        info = input_checks.series_header(tmp_path / name, series, "CT")
        image = LoadImage(image_only=True)(str(tmp_path / name))
        assert info.shape == tuple(image.shape)
        np.testing.assert_allclose(info.affine, np.asarray(image.affine), atol=1e-4)
    with pytest.raises(input_checks.InputError, match=r"\(series .*\): modality CT; this model expects MR"):
        input_checks.series_header(tmp_path / "up", series, "MR")


@pytest.mark.integration
def test_batch_inference_over_series_folders(ct_data, liver_data, tmp_path):
    """``scripts/batch_infer.py`` over a folder of series folders: a CT series gives the mask its NIfTI gives, a
    series with a missing slice is invalid (folder, series and problem named), and a liver case is the pair of
    folders ``<case>_t2w`` / ``<case>_dwi``."""
    import batch_infer
    from batch_infer import BatchOptions
    from monai.bundle import ConfigParser

    def random_weights(bundle: str) -> Path:
        root = BUNDLES / bundle
        use_bundle(root)
        parser = ConfigParser()
        parser.read_config([str(root / "configs" / "inference.json"), str(root / "configs" / "cpu_demo.json")])
        parser["bundle_root"] = str(root)
        torch.manual_seed(0)
        path = tmp_path / f"{bundle}.pt"
        torch.save(parser.get_parsed_content("network_def").state_dict(), path)
        return path

    inputs, nifti = tmp_path / "ct_in", tmp_path / "ct_nifti"
    nifti.mkdir()
    for case in ("ct_000", "ct_001"):
        image = nib.load(ct_data / "imagesTr" / f"{case}.nii.gz")
        values = dicom_io.quantised(np.asarray(image.dataobj, dtype=np.float32))
        nib.save(nib.Nifti1Image(values, image.affine), nifti / f"{case}.nii.gz")
        dicom_io.write_series(values, image.affine, inputs / case, "CT", case)
    (inputs / "ct_001" / "slice_0005.dcm").unlink()
    options = BatchOptions(checkpoint=str(random_weights(CT)), overlay="configs/cpu_demo.json", device="cpu",
                           png=True, progress=False)
    rows = {r["case"]: r for r in batch_infer.run_batch(str(BUNDLES / CT), str(inputs), str(tmp_path / "out"),
                                                        options)["cases"]}
    assert rows["ct_000"]["status"] == "done" and set(rows["ct_000"]["outputs"]) == {
        "seg", "confidence", "overview", "dicom_seg", "dicom_confidence"}
    assert rows["ct_001"]["status"] == "invalid"
    assert f"{inputs / 'ct_001'} (series 'ct_001'" in rows["ct_001"]["reason"]
    assert "1 missing slice(s)" in rows["ct_001"]["reason"]
    reference = batch_infer.run_batch(str(BUNDLES / CT), str(nifti), str(tmp_path / "out_nifti"), options)
    assert {r["case"]: r["status"] for r in reference["cases"]} == {"ct_000": "done", "ct_001": "done"}
    for name in ("seg", "confidence"):
        a = nib.load(tmp_path / "out_nifti" / "ct_000" / f"ct_000_{name}.nii.gz")
        b = nib.load(tmp_path / "out" / "ct_000" / f"ct_000_{name}.nii.gz")
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
        np.testing.assert_allclose(np.asarray(b.dataobj), np.asarray(a.dataobj), atol=1e-4)

    liver_in = tmp_path / "liver_in"
    for sequence in ("t2w", "dwi"):
        image = nib.load(liver_data / "imagesTr" / f"liver_000_{sequence}.nii.gz")
        dicom_io.write_series(np.asarray(image.dataobj, dtype=np.float32), image.affine,
                              liver_in / f"liver_000_{sequence}", "MR", sequence)
    options = replace(options, checkpoint=str(random_weights(LIVER)))
    summary = batch_infer.run_batch(str(BUNDLES / LIVER), str(liver_in), str(tmp_path / "liver_out"), options)
    (row,) = summary["cases"]
    assert row["case"] == "liver_000" and row["status"] == "done", row


def test_quantification_report_as_dicom_sr(tmp_path):
    """The liver's JSON quantification report of a series input becomes a TID 1500 SR: a point at the network's
    centre (RAS turned into DICOM's LPS) with its area on every slice where the network says tumour, and each
    lesion's volume; slices where it does not say tumour are left out, and NIfTI inputs get no SR."""
    import highdicom as hd
    from monai.data import MetaTensor
    from pydicom.sr.codedict import codes

    sr_module = bundle_module(LIVER, "dicom_sr")
    array, affine = _volume()
    folder = tmp_path / "liver_007_t2w"
    dicom_io.write_series(array, affine, folder, "MR", "T2WI")
    report = {"slices": [
        {"slice": 1, "network": {"tumour": True, "area_mm2": 52.5, "centre_world_mm": [-12.0, 20.5, -37.5]}},
        {"slice": 2, "network": {"tumour": False, "area_mm2": 0.4, "centre_world_mm": [-11.0, 20.0, -35.0]}},
        {"slice": 3, "mask": {"area_mm2": 3.0, "centre_world_mm": [0.0, 0.0, 0.0]}}],
        "lesions": [{"lesion": 1, "volume_mm3": 310.0}, {"lesion": 2, "volume_mm3": 45.5}]}
    out = tmp_path / "eval"
    (out / "liver_007").mkdir(parents=True)
    (out / "liver_007" / "liver_007_quantification.json").write_text(json.dumps(report))
    save = sr_module.SaveQuantificationSRd("pred", out, BUNDLES / LIVER / "configs" / "metadata.json",
                                           modality_suffixes=("_t2w", "_dwi"))
    pred = MetaTensor(torch.zeros(1, *array.shape), meta={"filename_or_obj": [str(folder), str(tmp_path / "dwi")]})
    save({"pred": pred})
    sr = hd.sr.srread(out / "liver_007" / "liver_007_dicom_sr.dcm")
    source = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == source.SeriesInstanceUID
    (planar,) = sr.content.get_planar_roi_measurement_groups()
    assert planar.tracking_identifier == "slice 1"
    (area,) = planar.get_measurements(name=codes.SCT.Area)
    assert area.value == pytest.approx(52.5) and area.unit == codes.UCUM.SquareMillimeter
    np.testing.assert_allclose(planar.roi.value, [[12.0, -20.5, -37.5]])
    assert planar.roi.frame_of_reference_uid == source.FrameOfReferenceUID
    volumes = {g.tracking_identifier: g.get_measurements(name=codes.SCT.Volume)[0].value
               for g in sr.content.get_image_measurement_groups()}
    assert volumes == pytest.approx({"lesion 1": 310.0, "lesion 2": 45.5})
    nifti = MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": str(tmp_path / "case.nii.gz")})
    save({"pred": nifti})
    assert len(list(out.rglob("*.dcm"))) == 1
