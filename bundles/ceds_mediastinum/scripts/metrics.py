"""A metric handler that gives surface-distance metrics each case's voxel spacing, so distances are in mm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler
from monai.utils import IgniteInfo, ensure_tuple, min_version, optional_import

reinit__is_reduced, _ = optional_import(
    "ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "reinit__is_reduced", as_type="decorator"
)

__all__ = ["SpacingAwareMetricHandler", "voxel_spacing"]


def voxel_spacing(image: torch.Tensor) -> list[float] | None:
    """Voxel spacing (mm) of a channel-first ``MetaTensor`` from the column norms of its affine, else None."""
    if not isinstance(image, MetaTensor):
        return None
    affine = np.asarray(image.affine, dtype=np.float64)
    spatial = image.ndim - 1
    return [float(v) for v in np.linalg.norm(affine[:spatial, :spatial], axis=0)]


class SpacingAwareMetricHandler(IgniteMetricHandler):
    """``IgniteMetricHandler`` that calls ``metric_fn(y_pred, y, spacing=...)`` case by case with the spacing
    read from the affine of ``y`` (or of ``y_pred``), e.g. for ``HausdorffDistanceMetric`` and
    ``SurfaceDistanceMetric``, whose MONAI handlers assume a spacing of 1.

    Args:
        metric_fn: a ``CumulativeIterationMetric`` accepting a ``spacing`` keyword.
        output_transform: maps ``engine.state.output`` to ``(list of y_pred, list of y)``, channel-first,
            e.g. ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: store the per-case values in ``engine.state.metric_details`` (for ``MetricsSaver``).
    """

    @reinit__is_reduced
    def update(self, output: Sequence[torch.Tensor]) -> None:  # type: ignore[override]
        """``output``: ``(y_pred, y)``, lists of channel-first one-hot tensors or batch-first tensors."""
        if len(output) != 2:
            raise ValueError(f"output must have length 2, got {len(output)}.")
        y_pred, y = output
        if isinstance(y_pred, torch.Tensor):
            y_pred, y = list(y_pred), list(y)
        for pred_i, y_i in zip(ensure_tuple(y_pred), ensure_tuple(y)):
            spacing = voxel_spacing(y_i) or voxel_spacing(pred_i)
            self.metric_fn(pred_i[None], y_i[None], spacing=spacing)

    def compute(self) -> Any:
        """The mean over cases, or NaN when no case has a defined value (e.g. every prediction is empty): MONAI's
        mean over no valid case is 0, which would read as a perfect distance."""
        result = super().compute()
        buffer = self.metric_fn.get_buffer()
        if isinstance(buffer, torch.Tensor) and buffer.numel() and torch.isnan(buffer).all():
            return float("nan")
        return result
