"""A throw-away PACS on loopback: Orthanc (Debian package) with its DICOMweb plugin, filled with phantom studies.

MONAI Label's DICOMweb datastore (``--studies http://127.0.0.1:<port>/dicom-web``) lists, downloads and labels the
series of a real PACS; this tool gives it one to talk to, without touching any Orthanc service of the machine:

1. ``start``: installs the Debian packages ``orthanc`` and ``orthanc-dicomweb`` with ``apt-get`` when ``Orthanc`` is
   not installed (root only), writes ``<work_dir>/orthanc.json`` (free HTTP and DICOM ports, storage in
   ``<work_dir>/storage``, no authentication, HTTP refused to anything but loopback, DICOMweb at ``/dicom-web/``),
   starts ``Orthanc`` in its own process group, waits until ``GET /system`` answers and records URL, ports and PID
   in ``<work_dir>/pacs.json``.
2. ``upload``: writes phantom mediastinal CT cases and liver MR studies (a T2WI and a DWI series each;
   ``scripts/phantoms.py``) as DICOM series (``scripts/dicom_io.py``), the tumour label of the first ``labelled``
   cases of each kind as a DICOM SEG (highdicom) that references its (first) series, and POSTs every file to
   Orthanc's ``/instances``; the UIDs go to ``<work_dir>/uploaded.json``.
3. ``stop``: ends the process group recorded in ``<work_dir>/pacs.json`` (only the Orthanc this tool started).

Orthanc 1.10 has no option for the address it listens on: ``RemoteAccessAllowed: false`` makes its HTTP server
answer loopback clients only, and its DICOM listener accepts no store, find, get or move from anyone
(``DicomAlwaysAllow*`` off, no modalities declared), so the DICOM port only answers C-ECHO.

Examples (from the repository root)::

    python scripts/pacs.py start                       # prints {"url": ..., "dicomweb": ..., "pid": ...}
    python scripts/pacs.py upload --n_ct 2 --n_liver 2 --labelled 1
    python scripts/pacs.py stop
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import fire

from monailabel_server import free_port, stop_pid, wait_until_answers

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK_DIR = REPO / "outputs" / "pacs"
PACKAGES = ("orthanc", "orthanc-dicomweb")
PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                "/usr/lib/*/orthanc/plugins/libOrthancDicomWeb.so*")


class OrthancUnavailable(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed and cannot be installed here."""


def _installed() -> tuple[str, str] | None:
    """``(Orthanc executable, DICOMweb plugin)`` when both are installed, else ``None``."""
    executable = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    plugins = sorted(p for pattern in PLUGIN_GLOBS for p in glob.glob(pattern))
    return (executable, plugins[0]) if executable and plugins else None


def ensure_orthanc() -> tuple[str, str]:
    """Find Orthanc and its DICOMweb plugin, installing ``orthanc orthanc-dicomweb`` with apt-get if needed.

    Returns:
        the Orthanc executable and the plugin's shared library.

    Raises:
        OrthancUnavailable: not installed, and apt-get is missing, not run as root or fails.
    """
    found = _installed()
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise OrthancUnavailable(f"Orthanc is not installed and cannot be installed here (needs root and apt-get): "
                                 f"apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise OrthancUnavailable(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    found = _installed()
    if not found:
        raise OrthancUnavailable(f"apt-get installed {' '.join(PACKAGES)} but no Orthanc/DICOMweb plugin was found")
    return found


def orthanc_config(work_dir: Path, http_port: int, dicom_port: int, plugin: str) -> dict:
    """The Orthanc configuration ``start`` writes (see the module docstring).

    Args:
        work_dir: folder of the storage and the index.
        http_port: REST and DICOMweb port.
        dicom_port: DICOM (C-ECHO only) port.
        plugin: the DICOMweb plugin's shared library.

    Returns:
        the configuration as a dict.
    """
    storage = str(work_dir / "storage")
    return {
        "Name": "pacs-phantoms",
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomPort": dicom_port,
        "DicomAet": "PHANTOMPACS",
        "DicomModalities": {},
        **{f"DicomAlwaysAllow{op}": False for op in ("Store", "Find", "FindWorklist", "Get", "Move")},
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }


def start(work_dir: str = str(DEFAULT_WORK_DIR), timeout: float = 60) -> dict:
    """Start Orthanc with a fresh storage in ``work_dir`` and wait until it answers.

    Args:
        work_dir: folder of the configuration, storage, log and ``pacs.json`` (its ``storage/`` is recreated).
        timeout: seconds to wait for ``GET /system``.

    Returns:
        ``{"url", "dicomweb", "http_port", "dicom_port", "pid", "log"}`` (also written to ``<work_dir>/pacs.json``).

    Raises:
        OrthancUnavailable: see :func:`ensure_orthanc`.
        RuntimeError: Orthanc exited or did not answer in time (it is stopped then), with the log tail.
    """
    executable, plugin = ensure_orthanc()
    work = Path(work_dir).resolve()
    shutil.rmtree(work / "storage", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = work / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(work, http_port, dicom_port, plugin), indent=2))
    log = work / "orthanc.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([executable, str(config)], cwd=work, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"
    info = {"url": url, "dicomweb": f"{url}/dicom-web", "http_port": http_port, "dicom_port": dicom_port,
            "pid": proc.pid, "log": str(log)}
    (work / "pacs.json").write_text(json.dumps(info, indent=2))
    return wait_until_answers(proc, f"{url}/system", log, "Orthanc", timeout, info)


def post_instance(url: str, path: Path) -> dict:
    """POST one DICOM file to Orthanc's ``/instances``; return Orthanc's answer (``ID``, ``Status``, ...)."""
    request = urllib.request.Request(f"{url}/instances", data=path.read_bytes(), method="POST",
                                     headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    if answer.get("Status") not in ("Success", "AlreadyStored"):
        raise RuntimeError(f"Orthanc refused {path}: {answer}")
    return answer


def write_seg(label, series_dir: Path, out_file: Path) -> str:
    """Write a binary tumour label as a DICOM SEG over the series in ``series_dir``; return its SeriesInstanceUID.

    Every slice gets a frame (empty ones too), so that a reader rebuilds the label on the series' full grid.

    Args:
        label: ``[X, Y, Z]`` 0/1 array on the series' grid (voxel ``(i, j, k)`` = column ``i``, row ``j``, slice
            ``k``, as ``scripts/dicom_io.py`` writes it).
        series_dir: the series written by :func:`dicom_io.write_series`.
        out_file: the SEG file to write.
    """
    import highdicom as hd
    import numpy as np
    import pydicom
    from pydicom.sr.codedict import codes

    sources = sorted((pydicom.dcmread(f) for f in series_dir.glob("*.dcm")), key=lambda ds: int(ds.InstanceNumber))
    frames = np.ascontiguousarray(np.asarray(label, dtype=np.uint8).transpose(2, 1, 0))
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="tumour",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="phantom", manufacturer_model_name="scripts/phantoms.py",
        software_versions="1", device_serial_number="0", series_description="tumour (phantom ground truth)",
        omit_empty_frames=False)
    seg.save_as(out_file)
    return str(seg.SeriesInstanceUID)


def upload(work_dir: str = str(DEFAULT_WORK_DIR), n_ct: int = 2, labelled: int = 1, seed: int = 0,
           n_liver: int = 0) -> dict:
    """Store phantom CT series and liver MR studies (and the labels of the first ``labelled`` cases of each kind as
    DICOM SEG) in the running Orthanc.

    Args:
        work_dir: the folder ``start`` used; ``phantoms/`` and ``dicom/`` are (re)written in it.
        n_ct: number of CT cases (one series each).
        labelled: number of cases of each kind (the first ones) whose tumour label is stored as a DICOM SEG.
        seed: phantom seed.
        n_liver: number of liver MR cases: one study each with a T2WI and a DWI series (``SeriesDescription``
            ``"T2WI"`` / ``"DWI"``, the same slice grid); a label references the T2WI series.

    Returns:
        ``{case: {"study", "series" (liver: the T2WI series), "series_dir" (its DICOM files), "seg_series" (or
        None), "image" (liver: the T2WI and DWI files), "label", "instances"}}`` with the NIfTI phantom files the
        series were written from (also written to ``<work_dir>/uploaded.json``).
    """
    import nibabel as nib
    import numpy as np

    import dicom_io
    import phantoms

    work = Path(work_dir).resolve()
    url = json.loads((work / "pacs.json").read_text())["url"]
    phantom_dir, dicom_dir = work / "phantoms", work / "dicom"
    for folder in (phantom_dir, dicom_dir):
        shutil.rmtree(folder, ignore_errors=True)
    cases = []  # (case, [(series description, NIfTI file)], label file)
    if n_ct:
        phantoms.mediastinal_ct(str(phantom_dir / "ct"), n_cases=n_ct, seed=seed, size=64, n_slices=48)
        cases += [(f.name[: -len(".nii.gz")], [(f"phantom {f.name[: -len('.nii.gz')]}", f)],
                   phantom_dir / "ct" / "labelsTr" / f.name)
                  for f in sorted((phantom_dir / "ct" / "imagesTr").glob("*.nii.gz"))]
    if n_liver:
        phantoms.liver_mri(str(phantom_dir / "liver"), n_cases=n_liver, seed=seed, size=64, n_slices=8)
        cases += [(f.name[: -len(".nii.gz")], [(d, phantom_dir / "liver" / "imagesTr" /
                                                f"{f.name[: -len('.nii.gz')]}_{s}.nii.gz")
                                               for d, s in (("T2WI", "t2w"), ("DWI", "dwi"))], f)
                  for f in sorted((phantom_dir / "liver" / "labelsTr").glob("*.nii.gz"))]
    uploaded, counts = {}, {}
    for case, sequences, label_file in cases:
        modality = "MR" if len(sequences) > 1 else "CT"
        index = counts[modality] = counts.get(modality, -1) + 1
        files, series, study = [], [], None
        for number, (description, image_file) in enumerate(sequences, start=1):
            image = nib.load(image_file)
            series_dir = dicom_dir / case / description
            uids = dicom_io.write_series(np.asarray(image.dataobj), image.affine, series_dir, modality,
                                         series_description=description, patient_id=case.upper(), study_uid=study,
                                         series_number=number)
            study = uids["study"]
            series.append((uids["series"], series_dir))
            files += sorted(series_dir.glob("*.dcm"))
        seg_series = None
        if index < labelled:  # on the first sequence's series
            seg_file = dicom_dir / f"{case}_seg.dcm"
            seg_series = write_seg(np.asarray(nib.load(label_file).dataobj), series[0][1], seg_file)
            files.append(seg_file)
        for path in files:
            post_instance(url, path)
        images = [str(f) for _, f in sequences]
        uploaded[case] = {"study": study, "series": series[0][0], "series_dir": str(series[0][1]),
                          "seg_series": seg_series,
                          "image": images[0] if len(images) == 1 else images, "label": str(label_file),
                          "instances": len(files)}
    (work / "uploaded.json").write_text(json.dumps(uploaded, indent=2))
    return uploaded


def stop(work_dir: str = str(DEFAULT_WORK_DIR)) -> str:
    """Stop the Orthanc recorded in ``<work_dir>/pacs.json`` (by its process group) and remove the record.

    Returns:
        what was done, as a sentence.
    """
    record = Path(work_dir).resolve() / "pacs.json"
    if not record.exists():
        return f"no {record}: nothing to stop"
    pid = int(json.loads(record.read_text())["pid"])
    stopped = stop_pid(pid)
    record.unlink()
    return f"stopped Orthanc pid {pid}" if stopped else f"Orthanc pid {pid} was not running"


if __name__ == "__main__":
    fire.Fire({"start": start, "upload": upload, "stop": stop})
