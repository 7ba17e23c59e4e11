"""Dictionary transforms for the quantification task: training targets and the inference report.

* :class:`QuantificationTargetsd` turns a 2D tumour label slice into the regression targets of the network's
  quantification head: tumour centre (x, y) and area, in mm / mm^2 in the slice frame (see
  :mod:`scripts.quantification`).
* :class:`SaveQuantificationd` writes, at inference, one JSON report per case with the network's per-slice
  estimates (mean and evidential aleatoric/epistemic standard deviations) converted to world millimetres, next to
  the same quantities measured on the predicted mask, and per-lesion volumes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple_rep

from .case_meta import case_name, voxel_spacing
from .evidential import nig_moments
from .quantification import implausible_slices, quantify_mask, slice_frame_to_world, slice_targets

__all__ = ["QuantificationTargetsd", "SaveQuantificationd"]

QUANT_NAMES: tuple[str, str, str] = ("centre_x", "centre_y", "area")
"""Order of the three quantification targets / network outputs: centre along array axis 0, axis 1, area."""


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class QuantificationTargetsd(MapTransform):
    """Compute the quantification targets of a 2D tumour label slice.

    For a label slice ``[1, H, W]`` (or ``[1, H, W, 1]``, a slice not yet squeezed) writes

    * ``data[quant_key]``: float32 tensor ``[3]`` = (centre x, centre y, area): the tumour centroid in mm measured
      from the centre of the slice's first pixel along array axes 0 and 1 (``mean index * spacing``) and the
      tumour area in mm^2 (``n_pixels * spacing_0 * spacing_1``);
    * ``data[mask_key]``: float32 tensor ``[3]``, ``(1, 1, 1)`` when the slice holds tumour, ``(0, 0, 1)`` when it
      does not: area 0 is a valid target, the centre is undefined.

    The spacing is that of the first two spatial axes of the label's affine (a MetaTensor's ``pixdim``), so place
    this transform after every spatial transform (spacing, resizing, random zoom/rotation), just before the
    network sees the slice; flips/rotations move the centre with the image as they should. A label that is not a
    MetaTensor needs ``pixdim``. Voxels ``> threshold`` are tumour (0/1 labels; 0.5 also binarises soft labels).

    Args:
        keys: the label key (one key per output pair).
        quant_key: output key(s) of the targets.
        mask_key: output key(s) of the target validity masks.
        threshold: tumour if label ``> threshold``.
        pixdim: in-plane spacing (mm) overriding the label's affine, e.g. for plain tensors.
        allow_missing_keys: skip records without a label (unlabelled data) instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        quant_key: str | Sequence[str] = "quant",
        mask_key: str | Sequence[str] = "quant_mask",
        threshold: float = 0.5,
        pixdim: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.quant_keys = ensure_tuple_rep(quant_key, len(self.keys))
        self.mask_keys = ensure_tuple_rep(mask_key, len(self.keys))
        self.threshold = threshold
        self.pixdim = None if pixdim is None else (float(pixdim[0]), float(pixdim[1]))

    def _spacing(self, label: Any) -> tuple[float, float]:
        if self.pixdim is not None:
            return self.pixdim
        if not isinstance(label, MetaTensor):
            raise ValueError(
                f"{type(self).__name__}: the label is a {type(label).__name__} without an affine; pass `pixdim`."
            )
        spacing = voxel_spacing(label.unsqueeze(0), 2)[0]
        return float(spacing[0]), float(spacing[1])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, quant_key, mask_key in self.key_iterator(d, self.quant_keys, self.mask_keys):
            label = d[key]
            shape = tuple(label.shape)
            if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1)) or shape[0] != 1:
                raise ValueError(f"{type(self).__name__}: expected a slice [1, H, W] or [1, H, W, 1], got {shape}.")
            mask = _to_numpy(label)[0].reshape(shape[1], shape[2]) > self.threshold
            cx, cy, area, has_tumour = slice_targets(mask, self._spacing(label))
            d[quant_key] = torch.tensor([cx, cy, area], dtype=torch.float32)
            d[mask_key] = torch.tensor([float(has_tumour), float(has_tumour), 1.0], dtype=torch.float32)
        return d


class SaveQuantificationd(MapTransform):
    """Write a case's quantification report ``<output_dir>/<case>/<case>_<output_postfix>.json``.

    Used in the inference post-processing in the PREPROCESSED space (before ``Invertd``); the world coordinates
    it reports come from the prediction's affine, which MONAI keeps consistent with the input image's world frame
    through spacing/orientation/crop/pad/resize transforms.

    Inputs (one decollated case):

    * ``data[keys[0]]`` (``pred``): predicted mask ``[1, H, W, D]`` (0/1, or probabilities ``> threshold``; with
      ``C >= 2`` channels the argmax is taken and every non-zero class is tumour), a MetaTensor with the affine of
      the preprocessed image (else ``data[meta_key].affine`` is used);
    * ``data[keys[1]]`` (``quant``): per-slice Normal-Inverse-Gamma parameters ``[D, 3, 4]`` for (centre x,
      centre y, area) x (gamma, nu, alpha, beta) in the units of :class:`QuantificationTargetsd` (slice frame,
      mm and mm^2); optional with ``allow_missing_keys`` (then only mask-derived values are written);
    * ``data[uncertainty_key]`` (optional): voxel uncertainty map ``[1, H, W, D]``, averaged per lesion.

    The case name is :func:`scripts.case_meta.case_name` of ``data[meta_key].meta["filename_or_obj"]`` with
    ``modality_suffixes`` (the first file for multi-channel inputs), falling back to
    ``data[f"{meta_key}_meta_dict"]`` and then to ``data["case"]``.

    The report (JSON) holds ``case``, ``source``, ``units``, ``geometry`` (spacing, shape, affine), ``slices`` (one
    entry for every slice where the mask has tumour or the network's area mean is at least ``min_area_pixels``
    pixels) with the network's centre in the slice frame and in world mm with aleatoric/epistemic standard
    deviations per world axis (:func:`scripts.quantification.slice_frame_to_world`), its area with both standard
    deviations, and the mask's area/centre on that slice; ``lesions`` from
    :func:`scripts.quantification.quantify_mask` (with ``mean_uncertainty`` when a map is given) and
    ``total_volume_mm3``, and ``implausible``: the slices where the network's centre or area contradicts the mask
    (:func:`scripts.quantification.implausible_slices`; ``scripts/batch_infer.py`` marks such a case
    ``needs_review``). It is written to a temporary file and moved into place (``os.replace``), so readers never
    see a partial report. The data are returned unchanged.

    Args:
        keys: ``(pred key, quant key)``.
        output_dir: root folder of the reports.
        meta_key: key of the input image whose file name names the case.
        uncertainty_key: key of the optional voxel uncertainty map.
        output_postfix: file name postfix.
        threshold: foreground threshold for one-channel predictions.
        min_area_pixels: the network "says tumour" on a slice when its area mean is at least this many pixels.
        connectivity: connectivity of the 3D lesion components (see ``quantify_mask``).
        modality_suffixes: file-name suffixes of the input channels, stripped from the case name.
        allow_missing_keys: allow a missing ``quant`` entry.
    """

    def __init__(
        self,
        keys: KeysCollection = ("pred", "quant"),
        output_dir: str | os.PathLike = "./eval",
        meta_key: str = "image",
        uncertainty_key: str = "uncertainty",
        output_postfix: str = "quantification",
        threshold: float = 0.5,
        min_area_pixels: float = 1.0,
        connectivity: int = 3,
        modality_suffixes: Sequence[str] = ("_t2w", "_dwi"),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 2:
            raise ValueError(f"{type(self).__name__}: keys must be (pred key, quant key), got {self.keys}.")
        self.output_dir = os.fspath(output_dir)
        self.meta_key = meta_key
        self.uncertainty_key = uncertainty_key
        self.output_postfix = output_postfix
        self.threshold = threshold
        self.min_area_pixels = min_area_pixels
        self.connectivity = connectivity
        self.modality_suffixes = tuple(modality_suffixes)

    def _case(self, data: Mapping[Hashable, Any]) -> tuple[str, str]:
        image = data.get(self.meta_key)
        meta = image.meta if isinstance(image, MetaTensor) else data.get(f"{self.meta_key}_meta_dict", {})
        source = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
        if source:
            source = source[0] if isinstance(source, (list, tuple)) else source
            return case_name(source, self.modality_suffixes), os.fspath(source)
        if "case" in data:
            return str(data["case"]), ""
        raise KeyError(f"{type(self).__name__}: no file name in '{self.meta_key}' meta data and no 'case' entry.")

    def _affine(self, data: Mapping[Hashable, Any], pred: Any) -> np.ndarray:
        source = pred if isinstance(pred, MetaTensor) else data.get(self.meta_key)
        if not isinstance(source, MetaTensor):
            raise ValueError(f"{type(self).__name__}: neither the prediction nor '{self.meta_key}' carries an affine.")
        return _to_numpy(source.affine).astype(np.float64)

    def _mask(self, pred: Any) -> np.ndarray:
        pred = _to_numpy(pred)
        if pred.ndim != 4:
            raise ValueError(f"{type(self).__name__}: expected a prediction [C, H, W, D], got shape {pred.shape}.")
        return pred[0] > self.threshold if pred.shape[0] == 1 else pred.argmax(axis=0) > 0

    def _network(self, quant: Any, depth: int, affine: np.ndarray) -> list[dict]:
        """Per-slice network estimates ([D, 3, 4] NIG parameters) as report entries (without the slice index)."""
        quant = torch.as_tensor(_to_numpy(quant), dtype=torch.float64)
        if quant.shape != (depth, 3, 4):
            raise ValueError(f"{type(self).__name__}: expected quant [D={depth}, 3, 4], got {tuple(quant.shape)}.")
        mean, aleatoric, epistemic = (t.numpy() for t in nig_moments(*quant.unbind(-1)))
        entries = []
        for k in range(depth):
            world, ale_var = slice_frame_to_world(mean[k, :2], k, affine, aleatoric[k, :2])
            _, epi_var = slice_frame_to_world(mean[k, :2], k, affine, epistemic[k, :2])
            entries.append(
                {
                    "centre_slice_mm": [float(mean[k, 0]), float(mean[k, 1])],
                    "centre_world_mm": [float(v) for v in world],
                    "centre_aleatoric_std_mm": [float(v) for v in np.sqrt(ale_var)],
                    "centre_epistemic_std_mm": [float(v) for v in np.sqrt(epi_var)],
                    "area_mm2": float(mean[k, 2]),
                    "area_aleatoric_std_mm2": float(np.sqrt(aleatoric[k, 2])),
                    "area_epistemic_std_mm2": float(np.sqrt(epistemic[k, 2])),
                }
            )
        return entries

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        pred_key, quant_key = self.keys
        present = set(self.key_iterator(data))
        if pred_key not in present:
            return data
        pred = data[pred_key]
        affine = self._affine(data, pred)
        mask = self._mask(pred)
        uncertainty = data.get(self.uncertainty_key)
        if uncertainty is not None:
            uncertainty = _to_numpy(uncertainty)
            uncertainty = uncertainty[0] if uncertainty.ndim == 4 else uncertainty  # [1, H, W, D] or [H, W, D]
        report = quantify_mask(mask, affine, uncertainty=uncertainty, connectivity=self.connectivity)
        spacing = report["spacing"]
        network = self._network(data[quant_key], mask.shape[2], affine) if quant_key in present else None

        mask_slices = {s["slice"]: s for s in report["slices"]}
        min_area = self.min_area_pixels * spacing[0] * spacing[1]
        slices = []
        for k in range(mask.shape[2]):
            says_tumour = network is not None and network[k]["area_mm2"] >= min_area
            if k not in mask_slices and not says_tumour:
                continue
            entry: dict[str, Any] = {"slice": k}
            if network is not None:
                entry["network"] = {"tumour": bool(says_tumour), **network[k]}
            in_mask = mask_slices.get(k)
            entry["mask"] = {
                "area_mm2": in_mask["area_mm2"] if in_mask else 0.0,
                "centre_world_mm": in_mask["centre_world_mm"] if in_mask else None,
            }
            slices.append(entry)

        case, source = self._case(data)
        content = {
            "case": case,
            "source": source,
            "units": {
                "centre_world_mm": "mm, world frame of the image affine (NIfTI/MONAI RAS)",
                "centre_slice_mm": "mm from the first pixel centre along array axes 0 and 1 of the slice",
                "area": "mm^2",
                "volume": "mm^3",
                "std": "evidential (Normal-Inverse-Gamma) standard deviation, unit of its value",
                "slice": "index along array axis 2 of the preprocessed image",
            },
            "geometry": {"spacing": spacing, "shape": report["shape"], "affine": affine.tolist()},
            "total_volume_mm3": report["total_volume_mm3"],
            "implausible": implausible_slices(slices, spacing[0] * spacing[1]) if network is not None else [],
            "slices": slices,
            "lesions": report["lesions"],
        }
        folder = os.path.join(self.output_dir, case)
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, f"{case}_{self.output_postfix}.json")
        fd, tmp = tempfile.mkstemp(prefix=f".{case}_", suffix=".json.tmp", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(content, f, indent=2)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return data
