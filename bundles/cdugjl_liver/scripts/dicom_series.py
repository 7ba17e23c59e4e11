"""Checks of a DICOM series folder given as a bundle input, before MONAI reads it.

The same file in both bundles of the collection (a test keeps the copies identical). An input (``"image"``, or one
entry of a list of per-sequence inputs) may be a folder holding one DICOM series instead of a NIfTI file;
``LoadImaged`` reads such a folder with MONAI's ``PydicomReader`` (pydicom), which stacks every DICOM file it finds
in the order of ``InstanceNumber`` and takes the slice spacing from the slice positions. A folder with two series, a
missing slice or uneven spacing would become a wrong volume without a word, so :class:`DicomSeriesCheckd` reads the
headers first and refuses such a folder with a sentence that names it and its series.

- :func:`check_series`: one folder (one series, the bundle's modality, one slice geometry, every slice present,
  even spacing, instance numbers in slice order).
- :class:`DicomSeriesCheckd`: the check as the first transform of a bundle's inference preprocessing; the folders
  of one multi-sequence input must also share their geometry.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["DicomSeriesCheckd", "DicomSeriesError", "check_series"]

SPACING_TOLERANCE = 0.01
"""Largest relative deviation of a slice gap from the median gap (1 %) before the spacing counts as uneven."""


class DicomSeriesError(ValueError):
    """A DICOM series folder that cannot be read as one volume: ``"<source>: <problem>"``.

    Args:
        source: the folder, with its series when known (``"<folder> (series '<description>' (<uid>))"``).
        problem: what is wrong, in words.
    """

    def __init__(self, source: str, problem: str) -> None:
        self.source, self.problem = source, problem
        super().__init__(f"{source}: {problem}")


def _series_name(header: Any) -> str:
    description = str(getattr(header, "SeriesDescription", "") or "").strip()
    uid = str(getattr(header, "SeriesInstanceUID", "?"))
    return f"series {description!r} ({uid})" if description else f"series {uid}"


def _headers(folder: Path) -> list[Any]:
    """The headers (no pixel data) of the DICOM files directly inside ``folder``, as ``PydicomReader`` finds them."""
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - pydicom is a requirement of both bundles
        raise ImportError(f"{folder}: reading a DICOM series needs pydicom (pip install pydicom)") from e
    files = sorted(p for p in folder.iterdir() if p.is_file() and pydicom.misc.is_dicom(str(p)))
    return [pydicom.dcmread(str(p), stop_before_pixels=True) for p in files]


def check_series(folder: str | os.PathLike, modality: str | None = None) -> dict[str, Any]:
    """Check that ``folder`` holds one complete, evenly spaced DICOM series of ``modality``.

    Args:
        folder: the series folder (its DICOM files directly inside).
        modality: the DICOM ``Modality`` the bundle expects (``"CT"``, ``"MR"``); ``None`` does not check it.

    Returns:
        ``{"series_uid", "description", "modality", "slices", "orientation" (6 direction cosines),
        "pixel_spacing" (between rows, between columns), "size" (rows, columns), "positions" (``[N, 3]`` slice
        origins in instance-number order, the order a reader stacks them), "spacing" (mm), "files" (in the same
        order), "headers" (their pydicom headers without pixel data, in the same order)}``.

    Raises:
        DicomSeriesError: ``"<folder> (<series>): <problem>"``: no DICOM file, several series, another or mixed
            modality, slices of different geometry, a repeated or missing slice, uneven spacing, instance numbers
            that do not follow the slice positions.
    """
    folder = Path(folder)
    headers = _headers(folder)
    if not headers:
        raise DicomSeriesError(str(folder), "holds no DICOM file (a series folder holds the files of one series)")
    series = {str(h.SeriesInstanceUID): h for h in headers}
    if len(series) > 1:
        names = ", ".join(_series_name(h) for h in series.values())
        raise DicomSeriesError(str(folder), f"holds {len(series)} series ({names}); give each series its own folder")
    name = f"{folder} ({_series_name(headers[0])})"
    modalities = sorted({str(getattr(h, "Modality", "")) for h in headers})
    if len(modalities) > 1:
        raise DicomSeriesError(name, f"mixed modalities {modalities} in one series")
    if modality is not None and modalities[0].upper() != modality.upper():
        raise DicomSeriesError(name, f"modality {modalities[0] or 'missing'}; this model expects {modality}")
    if len(headers) < 2:
        raise DicomSeriesError(name, "one slice; a volume needs at least two")
    for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns"):
        if any(getattr(h, tag, None) is None for h in headers):
            raise DicomSeriesError(name, f"a slice has no {tag}")
    geometry = {(tuple(np.round(np.asarray(h.ImageOrientationPatient, float), 4)),
                 tuple(np.round(np.asarray(h.PixelSpacing, float), 4)), int(h.Rows), int(h.Columns)) for h in headers}
    if len(geometry) > 1:
        raise DicomSeriesError(name, f"slices differ in orientation, pixel spacing or size ({len(geometry)} kinds)")
    orientation = np.asarray(headers[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.asarray([h.ImagePositionPatient for h in headers], float)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    if np.any(gaps < 1e-3):
        k = int(np.argmin(gaps))
        raise DicomSeriesError(name, f"two slices at the same position ({along[order][k]:.2f} mm along the normal)")
    spacing = float(np.median(gaps))
    uneven = np.abs(gaps - spacing) > SPACING_TOLERANCE * spacing
    if np.any(uneven):
        k = int(np.argmax(np.abs(gaps - spacing)))
        lo, hi = along[order][k], along[order][k + 1]
        missing = round(gaps[k] / spacing) - 1
        if missing >= 1 and abs(gaps[k] - (missing + 1) * spacing) <= SPACING_TOLERANCE * spacing:
            problem = f"{missing} missing slice(s) between {lo:.2f} and {hi:.2f} mm (spacing {spacing:.3g} mm)"
        else:
            problem = (f"uneven slice spacing: gaps from {gaps.min():.3g} to {gaps.max():.3g} mm (median "
                       f"{spacing:.3g} mm, first uneven gap between {lo:.2f} and {hi:.2f} mm)")
        raise DicomSeriesError(name, problem)
    numbers = np.asarray([int(getattr(h, "InstanceNumber", 0) or 0) for h in headers])
    by_number = along[np.argsort(numbers, kind="stable")]
    if len(set(numbers.tolist())) != len(numbers) or not (np.all(np.diff(by_number) > 0)
                                                          or np.all(np.diff(by_number) < 0)):
        raise DicomSeriesError(name, "the instance numbers do not follow the slice positions (a reader stacks the "
                               "slices by instance number)")
    stacked = np.argsort(numbers, kind="stable")
    return {"series_uid": str(headers[0].SeriesInstanceUID),
            "description": str(getattr(headers[0], "SeriesDescription", "") or ""), "modality": modalities[0],
            "slices": len(headers), "orientation": orientation.tolist(),
            "pixel_spacing": [float(v) for v in headers[0].PixelSpacing],
            "size": [int(headers[0].Rows), int(headers[0].Columns)], "positions": positions[stacked].tolist(),
            "spacing": spacing, "files": [str(headers[i].filename) for i in stacked],
            "headers": [headers[i] for i in stacked]}


class DicomSeriesCheckd(MapTransform):
    """Refuse a DICOM series folder that would not read as one volume (:func:`check_series`); files pass unchanged.

    Place it first, before ``LoadImaged``. For a key holding several folders (one per MR sequence) every folder is
    checked and they must share slice geometry (orientation, pixel spacing, size, slice positions).

    Args:
        keys: the input keys (a path or a list of paths each).
        modality: the DICOM ``Modality`` the bundle expects (``"CT"``, ``"MR"``).
        allow_missing_keys: skip absent keys.

    Raises:
        DicomSeriesError: naming the folder and its series.
    """

    def __init__(self, keys: KeysCollection, modality: str | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality = modality

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = d[key] if isinstance(d[key], (list, tuple)) else [d[key]]
            folders = [Path(p) for p in paths if isinstance(p, (str, os.PathLike)) and Path(p).is_dir()]
            checked = [(folder, check_series(folder, self.modality)) for folder in folders]
            for folder, info in checked[1:]:
                first_folder, first = checked[0]
                same = (np.allclose(info["orientation"], first["orientation"], atol=1e-4)
                        and np.allclose(info["pixel_spacing"], first["pixel_spacing"], rtol=1e-4)
                        and info["size"] == first["size"] and info["slices"] == first["slices"]
                        and np.allclose(info["positions"], first["positions"], atol=0.01))
                if not same:
                    raise DicomSeriesError(
                        f"{folder} (series {info['description']!r}) and {first_folder} (series "
                        f"{first['description']!r})", "the sequences of one input must share their slice geometry "
                        "(orientation, pixel spacing, size, positions); resample one onto the other first")
        return d
