"""MONAI Label on a real PACS: Orthanc (Debian package + DICOMweb plugin) on loopback, driven over HTTP only.

``scripts/pacs.py`` starts Orthanc (installing it with apt-get when missing; the module is skipped only when that is
impossible) and stores two phantom CT series and two liver MR studies (a T2WI and a DWI series each), the first of
each kind with its tumour label as a DICOM SEG written by highdicom.
``scripts/monailabel_server.py serve --studies_dir <dicomweb URL>`` starts MONAI Label 0.8.5 on that DICOMweb
endpoint with the CEDS bundle (``cpu_demo`` widths, random weights unless the quick start's exist). Then, as the
README's "From a PACS" block does: the datastore lists the PACS's series, inference on the unlabelled series returns
a label on the series' grid, that label is saved (``PUT /datastore/label``) and must appear in Orthanc as a DICOM SEG
referencing its series, the training datalist must pair both series with labels read back from Orthanc's SEGs, and
one training epoch must rewrite the served ``models/model.pt``. The same for the liver bundle from a second
server on the same PACS, whose input is two series of one study stacked as channels (``scripts/monailabel_app.py``:
one image per study, named by its T2WI series). Every process started is stopped at the end.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monailabel_http import multipart, request

pytestmark = pytest.mark.integration

MODEL = "ceds_mediastinum"
LIVER = "cdugjl_liver"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc with the uploaded phantoms; yields ``pacs.json``'s fields plus ``work`` and ``uploaded``."""
    import monailabel_server
    import pacs as tool

    work = tmp_path_factory.mktemp("pacs")
    try:
        info = tool.start(str(work))
    except tool.OrthancUnavailable as err:
        pytest.skip(f"no Orthanc: {err}")
    try:
        uploaded = tool.upload(str(work), n_ct=2, labelled=1, n_liver=2)
        yield {**info, "work": work, "uploaded": uploaded, "bad": _bad_liver_studies(info["url"], work, uploaded)}
    finally:
        tool.stop(str(work))
        assert not monailabel_server._alive(info["pid"]), f"Orthanc {info['pid']} still running"


def _serve(bundle: str, venv: Path, pacs: dict, work: Path):
    """MONAI Label serving ``bundle`` from the PACS's DICOMweb endpoint; yields ``server.json`` + ``app``."""
    import monailabel_server as helper

    try:
        helper.serve(work_dir=str(work), bundles=bundle, studies_dir=pacs["dicomweb"], cpu_demo=True,
                     random_weights=True, port=helper.free_port(), venv=str(venv), detach=True)
        info = json.loads((work / "server.json").read_text())
        yield {**info, "app": work / "apps" / "monaibundle", "work": work}
    finally:
        pid = json.loads((work / "server.json").read_text())["pid"] if (work / "server.json").exists() else None
        helper.stop(str(work))
        assert pid is None or not helper._alive(pid), f"MONAI Label server {pid} still running"


def _bad_liver_studies(url: str, work: Path, uploaded: dict) -> dict[str, str]:
    """Two more liver studies from liver_001's volumes, stored before any server lists the PACS: ``"incomplete"``
    (a T2WI series only) and ``"mismatched"`` (its DWI series 5 mm off the T2WI's slice grid); their T2WI series."""
    import dicom_io
    import pacs as tool

    t2w, dwi = (nib.load(f) for f in uploaded["liver_001"]["image"])
    shifted = dwi.affine.copy()
    shifted[2, 3] += 5.0
    bad = {}
    for name, sequences in (("incomplete", [("T2WI", t2w.affine)]),
                            ("mismatched", [("T2WI", t2w.affine), ("DWI", shifted)])):
        study = None
        for number, (description, affine) in enumerate(sequences, start=1):
            folder = work / "dicom" / f"bad_{name}" / description
            volume = np.asarray((t2w if description == "T2WI" else dwi).dataobj)
            uids = dicom_io.write_series(volume, affine, folder, "MR", series_description=description,
                                         patient_id=f"BAD_{name.upper()}", study_uid=study, series_number=number)
            study = study or uids["study"]
            bad.setdefault(name, uids["series"])
            for path in sorted(folder.glob("*.dcm")):
                tool.post_instance(url, path)
    return bad


@pytest.fixture(scope="module")
def server(monailabel_venv, pacs, tmp_path_factory):
    yield from _serve(MODEL, monailabel_venv, pacs, tmp_path_factory.mktemp("monailabel_pacs"))


@pytest.fixture(scope="module")
def liver_server(monailabel_venv, pacs, tmp_path_factory):
    yield from _serve(LIVER, monailabel_venv, pacs, tmp_path_factory.mktemp("monailabel_pacs_liver"))


def _cases(pacs: dict, prefix: str) -> dict[str, dict]:
    return {case: info for case, info in pacs["uploaded"].items() if case.startswith(prefix)}


def _infer(server: dict, bundle: str, series: str, out: Path) -> Path:
    """``POST /infer/<bundle>`` on the image ``series``; the returned label written to ``out``."""
    body, content_type = multipart({"params": json.dumps({"device": "cpu"})})
    out.write_bytes(request(server, "POST", f"/infer/{bundle}?image={series}&output=image", body, content_type))
    return out


def _save_label(server: dict, bundle: str, series: str, label: Path) -> None:
    """``PUT /datastore/label`` of ``label`` as the final label of the image ``series`` (a DICOM SEG in Orthanc)."""
    params = json.dumps({"label_info": [{"name": "tumour", "model_name": bundle}]})
    body, content_type = multipart({"params": params}, {"label": label})
    request(server, "PUT", f"/datastore/label?image={series}&tag=final", body, content_type)


def _assert_training_round_rewrites_model(server: dict, bundle: str) -> None:
    """One MONAI Label training epoch of ``bundle`` must rewrite the served ``models/model.pt``."""
    model = server["app"] / "model" / bundle / "models" / "model.pt"
    before = model.stat().st_mtime_ns
    params = {"max_epochs": 1, "device": "cpu", "val_split": 0.5, "multi_gpu": False}
    request(server, "POST", f"/train/{bundle}?run_sync=true", json.dumps(params).encode(), "application/json")
    assert model.stat().st_mtime_ns != before, "models/model.pt not rewritten"


def _orthanc_segs(pacs: dict) -> dict[str, str]:
    """``{SEG SeriesInstanceUID: referenced image SeriesInstanceUID}`` of every SEG in Orthanc (over its REST API)."""
    find = urllib.request.Request(
        f"{pacs['url']}/tools/find", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"Level": "Instance", "Query": {"Modality": "SEG"}, "Expand": True}).encode())
    with urllib.request.urlopen(find, timeout=30) as response:
        instances = json.loads(response.read())
    segs = {}
    for instance in instances:
        with urllib.request.urlopen(f"{pacs['url']}/instances/{instance['ID']}/tags?simplify", timeout=30) as response:
            tags = json.loads(response.read())
        segs[tags["SeriesInstanceUID"]] = tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"]
    return segs


def test_datastore_lists_the_pacs_series(server, pacs):
    stats = json.loads(request(server, "GET", "/datastore/?output=stats"))
    assert stats["total"] == 2 and stats["completed"] == 1, stats  # ct_000 has a SEG in the PACS


def test_infer_returns_label_on_series_grid_and_saves_it_as_seg(server, pacs):
    case = pacs["uploaded"]["ct_001"]
    out = _infer(server, MODEL, case["series"], server["work"] / "ct_001_infer.nii.gz")
    label, source = nib.load(out), nib.load(case["image"])
    assert label.shape == source.shape == (64, 64, 48)  # one voxel per pixel of each of the 48 slices
    np.testing.assert_allclose(label.affine, source.affine, atol=1e-3)
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}

    assert case["series"] not in _orthanc_segs(pacs).values()
    _save_label(server, MODEL, case["series"], out)
    segs = _orthanc_segs(pacs)
    assert sorted(set(segs.values()) - {c["series"] for c in _cases(pacs, "liver").values()}) == sorted(
        c["series"] for c in _cases(pacs, "ct").values()), segs


def _in_monailabel_venv(venv: Path, code: str, *args: str):
    """Run ``code`` (which prints JSON) with the MONAI Label venv's python (its PATH, as the server has it)."""
    import subprocess

    import monailabel_server

    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code, *args], env=monailabel_server._clean_env(venv),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_SUMMARY = """
import json, sys, SimpleITK as sitk
{convert}
a = sitk.GetArrayFromImage(sitk.ReadImage(label))
print(json.dumps([list(a.shape[::-1]), int((a > 0).sum())]))
"""


def _label_summary(venv: Path, label: Path) -> tuple[list[int], int]:
    """``([x, y, z] shape, foreground voxels)`` of a label file MONAI Label wrote (``.nrrd`` from a DICOM SEG),
    read with SimpleITK in the MONAI Label venv (the main venv has no NRRD reader)."""
    shape, foreground = _in_monailabel_venv(venv, _SUMMARY.format(convert="label = sys.argv[1]"), str(label))
    return shape, foreground


def test_monailabel_seg_round_trip_keeps_every_slice(pacs, monailabel_venv):
    """MONAI Label's own NIfTI -> DICOM SEG -> label conversions (``nifti_to_dicom_seg`` with the
    ``itkimage2segimage`` that ``serve`` installs, then ``dicom_seg_to_itk_image``) give back a label with empty
    slices on its series' full grid."""
    import monailabel_server

    monailabel_server.ensure_dcmqi(monailabel_venv)
    ct_000 = pacs["uploaded"]["ct_000"]
    truth = np.asarray(nib.load(ct_000["label"]).dataobj)
    assert 0 < np.count_nonzero(truth.sum(axis=(0, 1))) < truth.shape[2]  # some slices are empty
    convert = ("from monailabel.datastore.utils.convert import nifti_to_dicom_seg, dicom_seg_to_itk_image\n"
               "label = dicom_seg_to_itk_image(nifti_to_dicom_seg(sys.argv[1], sys.argv[2], [{'name': 'tumour'}]))")
    summary = _in_monailabel_venv(monailabel_venv, _SUMMARY.format(convert=convert),
                                  ct_000["series_dir"], ct_000["label"])
    assert summary == [list(truth.shape), int(truth.sum())]


def test_training_reads_labels_from_pacs(server, pacs, monailabel_venv):
    datalist = json.loads(request(server, "GET", "/datastore/?output=train"))
    pairs = {Path(item["image"]).name.split(".nii")[0]: Path(item["label"]) for item in datalist}
    assert sorted(pairs) == sorted(c["series"] for c in _cases(pacs, "ct").values()), datalist
    ct_000 = pacs["uploaded"]["ct_000"]  # its label exists only as the SEG that scripts/pacs.py stored in Orthanc
    truth = np.asarray(nib.load(ct_000["label"]).dataobj)
    assert _label_summary(monailabel_venv, pairs[ct_000["series"]]) == (list(truth.shape), int(truth.sum()))

    _assert_training_round_rewrites_model(server, MODEL)


def test_liver_study_is_one_image_of_both_sequences(liver_server, pacs):
    stats = json.loads(request(liver_server, "GET", "/datastore/?output=stats"))
    # liver_000, liver_001 and the mismatched study, not their seven series; the incomplete study is left out
    assert stats["total"] == 3 and stats["completed"] == 1, stats
    case = pacs["uploaded"]["liver_001"]
    out = _infer(liver_server, LIVER, case["series"], liver_server["work"] / "liver_001_infer.nii.gz")
    label, t2w = nib.load(out), nib.load(case["image"][0])
    assert label.shape == t2w.shape == (64, 64, 8)
    np.testing.assert_allclose(label.affine, t2w.affine, atol=1e-3)
    # the image MONAI Label gave the bundle: T2WI and DWI as the last axis, in channel order
    stacked = nib.load(next(p for p in (liver_server["work"] / "dicomweb-cache").rglob(f"{case['series']}.nii.gz")
                            if "labels" not in p.parts))
    assert stacked.shape == (64, 64, 8, 2)
    for channel, source in enumerate(case["image"]):
        truth = np.asarray(nib.load(source).dataobj, dtype=np.float32)
        np.testing.assert_allclose(np.asarray(stacked.dataobj)[..., channel], truth,
                                   atol=1e-3 * float(np.abs(truth).max()))  # int16 quantisation of the series

    _save_label(liver_server, LIVER, case["series"], out)
    assert case["series"] in _orthanc_segs(pacs).values()  # the SEG references the T2WI series


def test_liver_training_reads_stacked_studies_and_labels_from_pacs(liver_server, pacs):
    datalist = json.loads(request(liver_server, "GET", "/datastore/?output=train"))
    pairs = {Path(item["image"]).name.split(".nii")[0]: item for item in datalist}
    assert sorted(pairs) == sorted(c["series"] for c in _cases(pacs, "liver").values()), datalist
    assert all(nib.load(item["image"]).shape == (64, 64, 8, 2) for item in datalist)

    _assert_training_round_rewrites_model(liver_server, LIVER)


def test_liver_study_of_mismatched_sequences_is_refused_by_name(liver_server, pacs):
    import urllib.error

    series = pacs["bad"]["mismatched"]
    body, content_type = multipart({"params": json.dumps({"device": "cpu"})})
    req = urllib.request.Request(f"{liver_server['url']}/infer/{LIVER}?image={series}&output=image", data=body,
                                 method="POST", headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=600)
    assert err.value.code == 500
    deadline = time.monotonic() + 30  # the server logs the exception after it has answered
    while "differ in geometry" not in Path(liver_server["log"]).read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    message = next(line for line in Path(liver_server["log"]).read_text().splitlines() if "differ in geometry" in line)
    assert f"and {series} of one study" in message and "affines up to 5 mm apart" in message
