"""Surface distances in mm, shared by the bundles of this collection.

MONAI's ``HausdorffDistanceMetric`` and ``SurfaceDistanceMetric`` measure in voxels unless given a ``spacing``, and
their ignite handlers pass none. The subclasses here read each case's spacing from its affine
(:func:`scripts.case_meta.voxel_spacing`), so
that they run in MONAI's ``IgniteMetricHandler`` and give millimetres. Each bundle is downloaded alone, so each
ships this module; the copies are identical (``tests/test_common.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric

from .case_meta import voxel_spacing

__all__ = ["PhysicalHausdorffDistanceMetric", "PhysicalSurfaceDistanceMetric"]


class _UndefinedMeanIsNaN:
    """Mixin for a cumulative metric: the reduced value is NaN when every case is NaN (no defined distance, e.g.
    every prediction empty), instead of MONAI's 0, which would read as a perfect distance."""

    def aggregate(self, *args: Any, **kwargs: Any) -> Any:
        result = super().aggregate(*args, **kwargs)  # type: ignore[misc]
        buffer = self.get_buffer()  # type: ignore[attr-defined]
        if not (isinstance(buffer, torch.Tensor) and buffer.numel() and torch.isnan(buffer).all()):
            return result
        if isinstance(result, (tuple, list)):
            return (torch.full_like(result[0], float("nan")), *result[1:])
        return torch.full_like(result, float("nan"))


class PhysicalHausdorffDistanceMetric(_UndefinedMeanIsNaN, HausdorffDistanceMetric):
    """:class:`monai.metrics.HausdorffDistanceMetric` in mm: the spacing is read from the label's affine.

    MONAI's ignite handlers pass no ``spacing``; give one-hot ``[C, *spatial]`` MetaTensors per case (decollated).
    A case whose prediction or reference is empty gives NaN (undefined distance; left out of the mean).
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("spacing", voxel_spacing(y).tolist())
        value = super()._compute_tensor(y_pred, y, **kwargs)
        return torch.where(torch.isinf(value), torch.full_like(value, float("nan")), value)


class PhysicalSurfaceDistanceMetric(_UndefinedMeanIsNaN, SurfaceDistanceMetric):
    """:class:`monai.metrics.SurfaceDistanceMetric` (average surface distance) in mm, spacing from the label.

    A case whose prediction or reference is empty gives NaN (undefined distance; left out of the mean).
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("spacing", voxel_spacing(y).tolist())
        value = super()._compute_tensor(y_pred, y, **kwargs)
        return torch.where(torch.isinf(value), torch.full_like(value, float("nan")), value)
