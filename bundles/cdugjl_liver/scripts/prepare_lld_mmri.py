"""Convert the LLD-MMRI release and its MedSAM2 lesion masks into this bundle's dataset layout and datalists.

Usage (from the bundle folder, or with the file path)::

    python -m scripts.prepare_lld_mmri --root /data/LLD-MMRI --masks /data/LLD-MMRI-MedSAM2 --out_dir /data/lld_bundle \
        --label_ratio "[0.1,0.2,1.0]" --seed 0

Input (LLD-MMRI, https://github.com/LMMMEng/LLD-MMRI-Dataset, CC BY-NC 4.0):

* ``<root>/images/<patientID>/<studyUID>/<seriesUID>.nii.gz``: one series per MRI phase. The NIfTI headers lack
  the true geometry (unit spacing, no origin);
* ``<root>/labels/Annotation.json``: ``{"Annotation_info": {patientID: [entry, ...]}}`` with one entry per phase:
  ``studyUID``, ``seriesUID``, ``phase`` (one of :data:`LLD_PHASES`), ``pixel_spacing`` [2], ``slice_thickness``,
  ``slice_spacing``, ``origin`` [3], ``annotation`` ``{num_targets, lesion {"0": {category, bbox {"3D_box":
  {x_min, y_min, z_min, x_max, y_max, z_max}}}, ...}}``.
* ``--masks``: the MedSAM2 lesion masks (huggingface ``wanglab/LLD-MMRI-MedSAM2``; semi-automatic,
  MedSAM2 human-in-the-loop, not fully expert-drawn). Expected naming, searched recursively below ``--masks``:
  ``<patientID>_<category>_<phase without spaces>_0000.nii.gz`` (MedSAM's LLD-MMRI step-0 image naming, e.g.
  ``MR1234_6_T2WI_0000.nii.gz``), also accepted without the ``_<category>`` part and/or without ``_0000``
  (nnU-Net label style), one mask per phase. A mask must have the array shape of its series (it is read as
  an array on that series' grid; its own header is ignored); every label value ``> 0`` is lesion.

Output (the layout of the bundle's phantom data, ``scripts/phantoms.py``)::

    <out_dir>/imagesTr/<patientID>_{t2w,dwi,art,pv,delay}.nii.gz   float32, all on the T2WI grid
    <out_dir>/labelsTr/<patientID>.nii.gz                            uint8 0/1 lesion mask (when a mask exists)
    <out_dir>/dataset.json                                           MSD-style, every converted case
    <out_dir>/datalist_<pct>.json                                    training / unlabeled / validation / test
    <out_dir>/preparation.json                                       per-case provenance and skipped patients

Geometry: each series gets spacing ``(pixel_spacing[0], pixel_spacing[1], slice_spacing)`` along array axes
0, 1, 2 (``slice_thickness`` when ``slice_spacing`` is missing or 0) and ``origin`` from Annotation.json with an
identity direction in the DICOM/ITK LPS frame, exactly what MedSAM's step-0 script writes with SimpleITK (the
masks were made on those images); as a NIfTI (RAS) affine that is ``diag(-sx, -sy, sz)`` with translation
``(-ox, -oy, oz)``. DICOM lists pixel spacing as (row, column), i.e. (axis 1, axis 0): MedSAM's order is kept
and only matters for non-square pixels. The true direction cosines are not in the release
(axial acquisitions assumed). DWI and the contrast-enhanced phases (``C+A`` -> art, ``C+V`` -> pv, ``C+Delay`` ->
delay) are resampled (trilinear, zero outside) onto the T2WI grid using ONLY this header geometry: the phases are
separate series and no registration is performed, so patient motion between series remains.

Labels: the T2WI mask; if it is missing (or its shape does not match), the ``C+V`` then ``C+A`` mask is
resampled (nearest) onto the T2WI grid and the source is recorded in ``preparation.json`` (``mask_source``).
Patients without any usable mask become unlabelled records. A missing CE phase is replaced by the nearest
available one (:data:`CE_SUBSTITUTES`, recorded as ``ce_substitutes``); with no CE phase the record has no
``ce``. Patients without a T2WI or DWI series (entry or file) are skipped with a logged reason.

Splits (as ``scripts/phantoms.py datalist``): one permutation of the masked patients fixed by ``seed`` gives the
test then the validation patients (``round(fraction * n)``, at least one each, identical for every ratio); of the
remaining masked patients the first ``max(1, round(label_ratio * n_pool))`` are labelled (``training``), nested
across ratios, and the others plus every patient without a mask are ``unlabeled`` (records without ``label``).
The official challenge split is not used (its validation/test labels were not part of the challenge release).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch

__all__ = ["prepare", "series_affine", "find_masks", "split_records", "LLD_PHASES", "PHASE_SUFFIX"]

logger = logging.getLogger("prepare_lld_mmri")

LLD_PHASES: tuple[str, ...] = ("T2WI", "DWI", "In Phase", "Out Phase", "C-pre", "C+A", "C+V", "C+Delay")
"""Phase names used in Annotation.json."""

PHASE_SUFFIX: dict[str, str] = {"T2WI": "t2w", "DWI": "dwi", "C+A": "art", "C+V": "pv", "C+Delay": "delay"}
"""Phases written by this script and their file-name suffixes (the phantom dataset's names)."""

STUDENT_PHASES: tuple[str, str] = ("T2WI", "DWI")
TEACHER_PHASES: tuple[str, str, str] = ("C+A", "C+V", "C+Delay")
CE_SUBSTITUTES: dict[str, tuple[str, str]] = {
    "C+A": ("C+V", "C+Delay"),
    "C+V": ("C+Delay", "C+A"),
    "C+Delay": ("C+V", "C+A"),
}
"""Replacement order for a missing contrast-enhanced phase."""
MASK_FALLBACK: tuple[str, str] = ("C+V", "C+A")
"""Phases whose mask is resampled onto T2WI when the T2WI mask is missing, in order of preference."""

_NII = ".nii.gz"


def series_affine(entry: dict) -> np.ndarray:
    """NIfTI (RAS) affine of a series from its Annotation.json entry (identity LPS direction, see module doc).

    Args:
        entry: per-phase Annotation.json entry with ``pixel_spacing``, ``slice_spacing`` (or ``slice_thickness``)
            and ``origin``.

    Returns:
        4x4 float64 voxel-to-world matrix: ``diag(-sx, -sy, sz)``, translation ``(-ox, -oy, oz)``.
    """
    sx, sy = (abs(float(v)) for v in entry["pixel_spacing"][:2])
    sz = abs(float(entry.get("slice_spacing") or 0.0)) or abs(float(entry.get("slice_thickness") or 0.0))
    if not (sx > 0 and sy > 0 and sz > 0):
        raise ValueError(f"invalid spacing in Annotation.json entry: pixel_spacing={entry.get('pixel_spacing')}, "
                         f"slice_spacing={entry.get('slice_spacing')}, slice_thickness={entry.get('slice_thickness')}")
    ox, oy, oz = (float(v) for v in entry["origin"][:3])
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [-ox, -oy, oz]
    return affine


def find_masks(masks_dir: str | os.PathLike, patients: Sequence[str]) -> dict[tuple[str, str], str]:
    """Index the MedSAM2 masks below ``masks_dir`` by ``(patientID, phase)``.

    A file ``<patientID>[_<category>]_<phase without spaces>[_0000].nii.gz`` of a known patient is matched (the
    patient ID is matched against ``patients`` so IDs containing ``_`` or digits are unambiguous). When several files
    match, the first in sorted path order is used and the others are logged.

    Returns:
        ``{(patientID, phase): path}`` with ``phase`` as in Annotation.json (e.g. ``"C+V"``).
    """
    known = set(patients)
    compact = {p.replace(" ", ""): p for p in LLD_PHASES}
    found: dict[tuple[str, str], str] = {}
    for path in sorted(Path(masks_dir).rglob(f"*{_NII}")):
        stem = path.name[: -len(_NII)]
        stem = stem[: -len("_0000")] if stem.endswith("_0000") else stem
        for short, phase in compact.items():
            if not stem.endswith("_" + short):
                continue
            head = stem[: -len(short) - 1]
            with_category = re.fullmatch(r"(.+)_\d+", head)
            patient = head if head in known else (with_category.group(1) if with_category else None)
            if patient not in known:
                continue
            if (patient, phase) in found:
                logger.warning("%s: several %s masks, using %s and ignoring %s", patient, phase,
                               found[patient, phase], path)
            else:
                found[patient, phase] = str(path)
            break
    return found


def _load(path: str | os.PathLike) -> np.ndarray:
    """A 3D float32 array ``[X, Y, Z]`` from a NIfTI file (trailing singleton dimensions dropped)."""
    array = np.asarray(nib.load(os.fspath(path)).get_fdata(dtype=np.float32))
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {array.shape}")
    return array


def _resample(array: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray,
              mode: str) -> np.ndarray:
    """Resample ``array`` (world geometry ``affine``) onto the grid ``(shape, target_affine)``; zeros outside."""
    if array.shape == tuple(shape) and np.allclose(affine, target_affine, atol=1e-4):
        return array
    src = MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=torch.from_numpy(affine))
    dst = MetaTensor(torch.zeros((1, *shape), dtype=torch.float32), affine=torch.from_numpy(target_affine))
    out = ResampleToMatch(mode=mode, padding_mode="zeros", dtype=torch.float32)(src, dst)
    return out[0].numpy().astype(np.float32)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


class _Skip(Exception):
    """A patient cannot be converted (the message is the logged reason)."""


def _series(root: Path, patient: str, by_phase: dict[str, dict], phase: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one phase's series with its Annotation.json geometry; raises :class:`_Skip` with the reason."""
    entry = by_phase.get(phase)
    if entry is None:
        raise _Skip(f"no {phase} entry in Annotation.json")
    path = root / "images" / patient / str(entry["studyUID"]) / f"{entry['seriesUID']}{_NII}"
    if not path.is_file():
        raise _Skip(f"{phase} series file missing: {path}")
    try:
        return _load(path), series_affine(entry)
    except Exception as e:  # unreadable or malformed series / entry
        raise _Skip(f"{phase} series unusable: {e}") from e


def _convert_patient(root: Path, out: Path, patient: str, entries: list[dict], masks: dict) -> dict:
    """Convert one patient; returns ``{"record": ..., "info": ...}`` or raises :class:`_Skip`."""
    by_phase: dict[str, dict] = {}
    for entry in entries:
        if entry.get("phase") in by_phase:
            logger.warning("%s: several %s entries, using the first", patient, entry.get("phase"))
        by_phase.setdefault(entry.get("phase"), entry)

    t2w, t2w_affine = _series(root, patient, by_phase, "T2WI")
    dwi, dwi_affine = _series(root, patient, by_phase, "DWI")
    grid = (t2w.shape, t2w_affine)
    images = {"T2WI": t2w, "DWI": _resample(dwi, dwi_affine, *grid, mode="bilinear")}

    ce_loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for phase in TEACHER_PHASES:
        try:
            ce_loaded[phase] = _series(root, patient, by_phase, phase)
        except _Skip as reason:
            logger.info("%s: %s", patient, reason)
    substitutes = {}
    for phase in TEACHER_PHASES if ce_loaded else ():
        source = phase if phase in ce_loaded else next(p for p in CE_SUBSTITUTES[phase] if p in ce_loaded)
        if source != phase:
            substitutes[phase] = source
        images[phase] = _resample(*ce_loaded[source], *grid, mode="bilinear")

    label, mask_source = None, None
    for phase in ("T2WI", *MASK_FALLBACK):
        if (patient, phase) not in masks:
            continue
        path = masks[patient, phase]
        shape = images["T2WI"].shape if phase == "T2WI" else ce_loaded[phase][0].shape if phase in ce_loaded else None
        if shape is None:
            logger.warning("%s: ignoring %s mask %s (no usable %s series for its geometry)", patient, phase, path,
                           phase)
            continue
        mask = (_load(path) > 0).astype(np.float32)
        if mask.shape != shape:
            logger.warning("%s: ignoring %s mask %s: shape %s differs from the series %s", patient, phase, path,
                           mask.shape, shape)
            continue
        if phase != "T2WI":
            mask = _resample(mask, ce_loaded[phase][1], *grid, mode="nearest")
        label, mask_source = (mask > 0.5).astype(np.uint8), phase
        break

    record: dict = {"case": patient, "image": [f"imagesTr/{patient}_{PHASE_SUFFIX[p]}{_NII}" for p in STUDENT_PHASES]}
    if ce_loaded:
        record["ce"] = [f"imagesTr/{patient}_{PHASE_SUFFIX[p]}{_NII}" for p in TEACHER_PHASES]
    for phase, array in images.items():
        _save(array.astype(np.float32), t2w_affine, out / "imagesTr" / f"{patient}_{PHASE_SUFFIX[phase]}{_NII}")
    if label is not None:
        record["label"] = f"labelsTr/{patient}{_NII}"
        _save(label, t2w_affine, out / record["label"])

    categories = sorted({int(les["category"]) for e in entries
                         for les in (e.get("annotation", {}).get("lesion") or {}).values() if "category" in les})
    info = {
        "mask_source": mask_source,
        "ce_substitutes": substitutes,
        "missing_ce": [p for p in TEACHER_PHASES if p not in ce_loaded],
        "spacing": [float(s) for s in np.linalg.norm(t2w_affine[:3, :3], axis=0)],
        "shape": [int(s) for s in t2w.shape],
        "lesion_categories": categories,
        "tumour_voxels": int(label.sum()) if label is not None else None,
    }
    return {"record": record, "info": info}


def split_records(
    records: list[dict], label_ratio: float, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> dict[str, list[dict]]:
    """MSD split of converted records with the phantom datalist's rules (see module doc).

    Args:
        records: dataset records; those with ``"label"`` are the masked patients.
        label_ratio: fraction of the masked training pool that keeps its labels, in (0, 1].
        seed: split seed (the permutation is that of ``scripts/phantoms.py datalist``).
        val_fraction: fraction of the masked patients used for validation.
        test_fraction: fraction of the masked patients held out for testing.

    Returns:
        ``{"training", "unlabeled", "validation", "test"}`` lists of records.
    """
    if not 0.0 < label_ratio <= 1.0:
        raise ValueError(f"label_ratio must be in (0, 1], got {label_ratio}")
    labelled = sorted((r for r in records if "label" in r), key=lambda r: r["case"])
    unmasked = sorted((r for r in records if "label" not in r), key=lambda r: r["case"])
    n = len(labelled)
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 7919])).permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    n_val = max(1, int(round(val_fraction * n)))
    pool = [labelled[i] for i in order[n_test + n_val :]]
    if not pool:
        raise ValueError(f"{n} patients with masks are too few for a test, a validation and a training split")
    n_labelled = max(1, int(round(label_ratio * len(pool))))
    return {
        "training": pool[:n_labelled],
        "unlabeled": [{k: v for k, v in r.items() if k != "label"} for r in pool[n_labelled:] + unmasked],
        "validation": [labelled[i] for i in order[n_test : n_test + n_val]],
        "test": [labelled[i] for i in order[:n_test]],
    }


def prepare(
    root: str,
    masks: str,
    out_dir: str,
    label_ratio: float | Sequence[float] = 0.2,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    patients: Sequence[str] | None = None,
) -> list[str]:
    """Convert LLD-MMRI + MedSAM2 masks into ``out_dir`` and write one datalist per label ratio.

    Args:
        root: LLD-MMRI folder holding ``images/`` and ``labels/Annotation.json``.
        masks: folder holding the MedSAM2 masks (searched recursively, naming in the module doc).
        out_dir: output folder (created).
        label_ratio: one ratio or a list of ratios in (0, 1]; ``datalist_<round(100 * ratio)>.json`` each.
        seed: split seed.
        val_fraction: fraction of the masked patients used for validation.
        test_fraction: fraction of the masked patients used for testing.
        patients: optional subset of patient IDs to convert (default: all in Annotation.json).

    Returns:
        the paths of the written datalists.
    """
    root_dir, out = Path(root), Path(out_dir)
    annotation_path = root_dir / "labels" / "Annotation.json"
    if not annotation_path.is_file():
        raise FileNotFoundError(f"Annotation.json not found: {annotation_path}")
    annotations = json.loads(annotation_path.read_text())["Annotation_info"]
    selected = sorted(annotations) if patients is None else [str(p) for p in patients]
    unknown = [p for p in selected if p not in annotations]
    if unknown:
        raise ValueError(f"patients not in Annotation.json: {unknown[:10]}")
    mask_index = find_masks(masks, selected)
    logger.info("%d patients, %d masks found below %s", len(selected), len(mask_index), masks)

    records, provenance, skipped = [], {}, {}
    for i, patient in enumerate(selected):
        try:
            converted = _convert_patient(root_dir, out, patient, annotations[patient], mask_index)
        except _Skip as reason:
            skipped[patient] = str(reason)
            logger.warning("skipping %s: %s", patient, reason)
            continue
        except Exception as e:  # one malformed case must not end a long conversion: record it and go on
            skipped[patient] = f"error: {e!r}"
            logger.exception("skipping %s after an unexpected error", patient)
            continue
        records.append(converted["record"])
        provenance[patient] = converted["info"]
        logger.info("[%d/%d] %s: mask from %s", i + 1, len(selected), patient, converted["info"]["mask_source"])

    info = {
        "name": "LLD-MMRI",
        "description": "LLD-MMRI multi-phase liver MRI (T2WI, DWI; C+A/C+V/C+Delay for the teacher) with MedSAM2 "
        "semi-automatic lesion masks, all phases resampled onto the T2WI grid by header geometry (no registration); "
        "written by scripts/prepare_lld_mmri.py.",
        "reference": "https://github.com/LMMMEng/LLD-MMRI-Dataset; "
        "masks: https://huggingface.co/datasets/wanglab/LLD-MMRI-MedSAM2",
        "licence": "CC BY-NC 4.0",
        "tensorImageSize": "4D",
        "modality": {"0": "T2WI", "1": "DWI"},
        "modality_ce": {"0": "arterial (C+A)", "1": "portal venous (C+V)", "2": "delayed (C+Delay)"},
        "labels": {"0": "background", "1": "lesion"},
        "numTraining": len(records),
        "training": records,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "preparation.json").write_text(json.dumps({"cases": provenance, "skipped": skipped}, indent=2) + "\n")

    ratios = [float(r) for r in (label_ratio if isinstance(label_ratio, (list, tuple)) else [label_ratio])]
    paths = []
    for ratio in ratios:
        split = split_records(records, ratio, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
        path = out / f"datalist_{int(round(100 * ratio))}.json"
        path.write_text(json.dumps(split, indent=2) + "\n")
        paths.append(str(path))
        logger.info("%s: %d training, %d unlabeled, %d validation, %d test", path.name,
                    *(len(split[k]) for k in ("training", "unlabeled", "validation", "test")))

    fallback = sum(1 for v in provenance.values() if v["mask_source"] not in (None, "T2WI"))
    no_mask = sum(1 for v in provenance.values() if v["mask_source"] is None)
    substituted = sum(1 for v in provenance.values() if v["ce_substitutes"] or v["missing_ce"])
    logger.info(
        "summary: %d converted (%d T2WI masks, %d masks resampled from C+V/C+A, %d without mask), %d with missing CE "
        "phases, %d skipped%s", len(records), len(records) - fallback - no_mask, fallback, no_mask, substituted,
        len(skipped), "".join(f"\n  skipped {p}: {r}" for p, r in skipped.items()),
    )
    return paths


def main() -> None:
    """Command-line entry point (``python -m scripts.prepare_lld_mmri --root ... --masks ... --out_dir ...``)."""
    import fire

    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire(prepare)


if __name__ == "__main__":
    main()
