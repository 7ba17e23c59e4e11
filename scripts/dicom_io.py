"""Write a volume (a NIfTI file, or an array with its RAS affine) as a DICOM series, one file per slice.

The phantoms are NIfTI; a PACS holds DICOM. This tool turns a phantom (or any 3D NIfTI) into the series a scanner
would send, so that the bundles' DICOM input, the DICOM SEG output and the PACS route can be tested on known data::

    python scripts/dicom_io.py series --nifti imagesTr/ct_000.nii.gz --out_dir dicom/ct_000 --modality CT

Geometry: voxel ``(i, j, k)`` of the array is pixel ``(row j, column i)`` of slice ``k`` (``InstanceNumber = k +
1``); ``ImageOrientationPatient`` and ``ImagePositionPatient`` are the affine's columns and origin in DICOM's LPS
frame, so a reader that applies them (MONAI's ``PydicomReader``, then LPS -> RAS) returns the same array and affine.
Intensities are stored as signed 16-bit integers with ``RescaleSlope`` / ``RescaleIntercept`` (``slope`` chosen so
that the volume's range fits, or given); :func:`quantised` returns the values a reader gets back, so that a NIfTI
written from them holds exactly what the series holds.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import fire
import nibabel as nib
import numpy as np

__all__ = ["quantised", "write_series", "series"]

# DICOM storage classes of the single-frame images written here
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS


def _slope_intercept(array: np.ndarray, slope: float | None) -> tuple[float, float]:
    """``(slope, intercept)`` that map int16 to the array's range (``slope`` 1 and intercept 0 for integer data that
    fits, as CT in HU does)."""
    low, high = float(np.min(array)), float(np.max(array))
    if slope is None:
        integral = np.array_equal(array, np.round(array))
        slope = 1.0 if integral and -32768 <= low and high <= 32767 else max(high - low, 1e-6) / 65000.0
    intercept = 0.0 if slope == 1.0 else (high + low) / 2.0
    return float(slope), float(intercept)


def quantised(array: np.ndarray, slope: float | None = None) -> np.ndarray:
    """The float32 values a reader gets back from the series :func:`write_series` writes for ``array``."""
    slope, intercept = _slope_intercept(array, slope)
    stored = np.clip(np.round((array - intercept) / slope), -32768, 32767).astype(np.int16)
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def write_series(
    array: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    modality: str,
    series_description: str = "",
    patient_id: str = "PHANTOM",
    study_uid: str | None = None,
    series_number: int = 1,
    slope: float | None = None,
) -> dict[str, str]:
    """Write ``array`` (``[X, Y, Z]``) as a DICOM series of ``Z`` files ``<out_dir>/slice_<k>.dcm``.

    Args:
        array: the volume, in the index order of ``affine``.
        affine: ``4 x 4`` voxel-to-RAS (mm) matrix; its columns need not be axis-aligned, but must be orthogonal.
        out_dir: the series folder (created; it must not hold other files).
        modality: ``"CT"`` or ``"MR"``.
        series_description: ``SeriesDescription`` (e.g. ``"T2WI"``).
        patient_id: ``PatientID`` and ``PatientName``.
        study_uid: ``StudyInstanceUID`` (a new one when ``None``): give the sequences of one liver exam the same.
        series_number: ``SeriesNumber``.
        slope: ``RescaleSlope`` (``None``: chosen from the range, see :func:`quantised`).

    Returns:
        ``{"study", "series", "frame_of_reference"}`` instance UIDs.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if modality not in SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASS)}, got {modality!r}")
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"a series is written from a 3D volume, got shape {array.shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: a series folder holds one series")
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    directions = LPS @ affine[:3, :3] / spacing  # columns: the i, j, k directions in LPS
    slope_, intercept = _slope_intercept(array, slope)
    stored = np.clip(np.round((array - intercept) / slope_), -32768, 32767).astype(np.int16)
    uids = {"study": study_uid or generate_uid(), "series": generate_uid(), "frame_of_reference": generate_uid()}
    now = datetime.datetime.now()
    for k in range(array.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASS[modality], meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientID, ds.PatientName = patient_id, f"{patient_id}^"  # family name only
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
        ds.FrameOfReferenceUID = uids["frame_of_reference"]
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber = "1", ""
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.SeriesDescription = series_description
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*directions[:, 0], *directions[:, 1])]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in LPS @ (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # between rows (j), between columns (i)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = array.shape[1], array.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope_:.10g}", f"{intercept:.10g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # [rows = j, columns = i]
        ds.save_as(out / f"slice_{k:04d}.dcm", enforce_file_format=True)
    return uids


def series(nifti: str, out_dir: str, modality: str, series_description: str = "", patient_id: str = "PHANTOM",
           study_uid: str | None = None, series_number: int = 1, channel: int | None = None) -> None:
    """Command line: write a NIfTI volume (one ``channel`` of a 4D one) as a DICOM series; prints its UIDs.

    Args:
        nifti: the volume.
        out_dir, modality, series_description, patient_id, study_uid, series_number: see :func:`write_series`.
        channel: the index along the fourth axis of a 4D volume.
    """
    image = nib.load(nifti)
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 4:
        if channel is None:
            raise ValueError(f"{nifti} is 4D ({data.shape}): pass --channel")
        data = data[..., channel]
    print(write_series(data, image.affine, out_dir, modality, series_description, patient_id, study_uid,
                       series_number))


if __name__ == "__main__":
    fire.Fire({"series": series})
