"""Evaluation metrics in physical units: surface distances with the label's spacing, quantification errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import CumulativeIterationMetric, HausdorffDistanceMetric, SurfaceDistanceMetric

from .quantification import slice_targets

__all__ = ["PhysicalHausdorffDistanceMetric", "PhysicalSurfaceDistanceMetric", "QuantificationErrorMetric"]


def _spacing(y: torch.Tensor) -> list[float] | None:
    """Voxel spacing (mm) of an unbatched-meta MetaTensor ``[1, C, *spatial]``, ``None`` for a plain tensor."""
    if not isinstance(y, MetaTensor):
        return None
    return [float(s) for s in y.pixdim[: y.ndim - 2]]


class PhysicalHausdorffDistanceMetric(HausdorffDistanceMetric):
    """:class:`monai.metrics.HausdorffDistanceMetric` in mm: the spacing is read from the label's affine.

    MONAI's ignite handlers pass no ``spacing``; give one-hot ``[C, *spatial]`` MetaTensors per case (decollated).
    A case whose prediction or reference is empty gives NaN (undefined distance; left out of the mean).
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("spacing", _spacing(y))
        value = super()._compute_tensor(y_pred, y, **kwargs)
        return torch.where(torch.isinf(value), torch.full_like(value, float("nan")), value)


class PhysicalSurfaceDistanceMetric(SurfaceDistanceMetric):
    """:class:`monai.metrics.SurfaceDistanceMetric` (average surface distance) in mm, spacing from the label.

    A case whose prediction or reference is empty gives NaN (undefined distance; left out of the mean).
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("spacing", _spacing(y))
        value = super()._compute_tensor(y_pred, y, **kwargs)
        return torch.where(torch.isinf(value), torch.full_like(value, float("nan")), value)


class QuantificationErrorMetric(CumulativeIterationMetric):
    """Per-case mean absolute error of the network's per-slice quantification against the label's.

    For every slice of the label that holds tumour, the reference centre (mm, slice frame) and area (mm^2) are
    measured with :func:`scripts.quantification.slice_targets`; the error is averaged over those slices:

    - ``"centre"``: the Euclidean distance (mm) between the predicted and the reference centre;
    - ``"area"``: the absolute area difference (mm^2).

    Cases without tumour give NaN (left out of the mean).

    Args:
        quantity: ``"centre"`` or ``"area"``.

    Call with ``y_pred`` = per-slice NIG parameters ``[D, 3, 4]`` (or their means ``[D, 3]``) and ``y`` = the label
    ``[1, H, W, D]`` in the same (preprocessed) space, as MetaTensor carrying its affine; lists of cases are accepted.
    """

    def __init__(self, quantity: str = "centre") -> None:
        super().__init__()
        if quantity not in ("centre", "area"):
            raise ValueError(f"quantity must be 'centre' or 'area', got {quantity!r}.")
        self.quantity = quantity

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``y_pred`` ``[1, D, 3(, 4)]``, ``y`` ``[1, 1, H, W, D]`` -> ``[1, 1]`` error."""
        pred = y_pred[0].detach().float().cpu()
        pred = pred[..., 0] if pred.ndim == 3 else pred  # NIG gamma
        spacing = _spacing(y) or [1.0, 1.0]
        label = y[0, 0].detach().cpu().numpy() > 0
        errors = []
        for k in range(label.shape[-1]):
            c0, c1, area, has_tumour = slice_targets(label[..., k], spacing[:2])
            if not has_tumour:
                continue
            if self.quantity == "centre":
                errors.append(float(np.hypot(pred[k, 0] - c0, pred[k, 1] - c1)))
            else:
                errors.append(abs(float(pred[k, 2]) - area))
        value = float(np.mean(errors)) if errors else float("nan")
        return torch.tensor([[value]])

    def aggregate(self) -> torch.Tensor:
        """The mean over cases, ignoring NaN."""
        data = self.get_buffer()
        return torch.nanmean(data) if isinstance(data, torch.Tensor) else torch.tensor(float("nan"))
