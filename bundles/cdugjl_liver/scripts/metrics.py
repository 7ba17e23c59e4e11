"""Evaluation metrics: quantification errors and the quality of the voxel uncertainty.

* HD95 / ASD in mm: :mod:`scripts.surface_metrics` (the same file in both bundles of the collection);
* :class:`QuantificationErrorMetric`: per-case errors of the per-slice tumour centre (x, y) and area;
* :class:`CalibrationErrorMetric`: binned expected calibration error of the predicted probabilities;
* :class:`UncertaintyAUROCMetric`: how well the voxel uncertainty finds the wrongly segmented voxels
  (:func:`rank_auroc`, the Mann-Whitney form of the area under the ROC curve);
* :class:`CaseTableSaver`: one CSV with a row per case and a column per metric.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import CumulativeIterationMetric

from .quantification import slice_targets
from .case_meta import voxel_spacing

__all__ = [
    "CalibrationErrorMetric",
    "CaseTableSaver",
    "QuantificationErrorMetric",
    "UncertaintyAUROCMetric",
    "expected_calibration_error",
    "rank_auroc",
]


class QuantificationErrorMetric(CumulativeIterationMetric):
    """Per-case mean absolute error of the network's per-slice quantification against the label's.

    For every slice of the label that holds tumour, the reference centre (mm, slice frame) and area (mm^2) are
    measured with :func:`scripts.quantification.slice_targets`; the error is averaged over those slices:

    - ``"centre"``: the Euclidean distance (mm) between the predicted and the reference centre;
    - ``"x"``, ``"y"``: the absolute error (mm) of the centre along the first / second in-plane array axis;
    - ``"area"``: the absolute area difference (mm^2).

    Cases without tumour give NaN (left out of the mean).

    Args:
        quantity: ``"centre"``, ``"x"``, ``"y"`` or ``"area"``.

    Call with ``y_pred`` = per-slice NIG parameters ``[D, 3, 4]`` (or their means ``[D, 3]``) and ``y`` = the label
    ``[1, H, W, D]`` in the same (preprocessed) space, as MetaTensor carrying its affine; lists of cases are accepted.
    """

    def __init__(self, quantity: str = "centre") -> None:
        super().__init__()
        if quantity not in ("centre", "x", "y", "area"):
            raise ValueError(f"quantity must be 'centre', 'x', 'y' or 'area', got {quantity!r}.")
        self.quantity = quantity

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``y_pred`` ``[1, D, 3(, 4)]``, ``y`` ``[1, 1, H, W, D]`` -> ``[1, 1]`` error."""
        pred = y_pred[0].detach().float().cpu()
        pred = pred[..., 0] if pred.ndim == 3 else pred  # NIG gamma
        spacing = voxel_spacing(y)[0].tolist()
        label = y[0, 0].detach().cpu().numpy() > 0
        errors = []
        for k in range(label.shape[-1]):
            c0, c1, area, has_tumour = slice_targets(label[..., k], spacing[:2])
            if not has_tumour:
                continue
            if self.quantity == "centre":
                errors.append(float(np.hypot(pred[k, 0] - c0, pred[k, 1] - c1)))
            elif self.quantity == "x":
                errors.append(abs(float(pred[k, 0]) - c0))
            elif self.quantity == "y":
                errors.append(abs(float(pred[k, 1]) - c1))
            else:
                errors.append(abs(float(pred[k, 2]) - area))
        value = float(np.mean(errors)) if errors else float("nan")
        return torch.tensor([[value]])

    def aggregate(self) -> torch.Tensor:
        """The mean over cases, ignoring NaN."""
        data = self.get_buffer()
        return torch.nanmean(data) if isinstance(data, torch.Tensor) else torch.tensor(float("nan"))


def rank_auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for finding ``positives`` (Mann-Whitney U with mid-ranks for ties).

    ``AUROC = (sum of the positives' ranks - n_p (n_p + 1) / 2) / (n_p n_n)``: the probability that a random
    positive scores higher than a random negative, ties counting one half.

    Args:
        scores: any shape, higher = more likely positive.
        positives: boolean, same shape.

    Returns:
        the AUROC, NaN when there are no positives or no negatives.
    """
    scores = scores.flatten().double()
    positives = positives.flatten().bool()
    n_pos = int(positives.sum())
    n_neg = positives.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    # mid-rank (1-based) of every distinct value: ranks before it + (count + 1) / 2
    mid_rank = torch.cumsum(counts, 0).double() - (counts.double() - 1) / 2
    rank_sum = mid_rank[inverse][positives].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """Binned expected calibration error ``sum_b (n_b / N) |accuracy_b - mean confidence_b|``.

    Args:
        confidence: the probability of the predicted class, in ``[0, 1]``, any shape.
        correct: boolean, whether the predicted class is right, same shape.
        n_bins: equal-width confidence bins over ``[0, 1]`` (a confidence of exactly 1 falls in the last).

    Returns:
        the ECE in ``[0, 1]``, NaN for an empty input.
    """
    confidence = confidence.flatten().double()
    correct = correct.flatten().double()
    if confidence.numel() == 0:
        return float("nan")
    bins = (confidence * n_bins).long().clamp(0, n_bins - 1)
    counts = torch.bincount(bins, minlength=n_bins).double()
    gap = (torch.bincount(bins, correct, n_bins) - torch.bincount(bins, confidence, n_bins)).abs()
    return float(gap.sum() / counts.sum())


def _voxels(y_pred: torch.Tensor, y: torch.Tensor, region: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predicted class, reference class and the evaluated-voxel mask of one case ``[1, K, *spatial]``."""
    pred = y_pred[0].argmax(0)
    ref = y[0].argmax(0) if y.shape[1] > 1 else (y[0, 0] > 0.5).long()
    if region == "all":
        mask = torch.ones_like(pred, dtype=torch.bool)
    else:  # "foreground": union of the predicted and the reference foreground (every wrong voxel is in it)
        mask = (pred > 0) | (ref > 0)
    return pred, ref, mask


class CalibrationErrorMetric(CumulativeIterationMetric):
    """Per-case binned expected calibration error of the voxel-wise class probabilities.

    The confidence of a voxel is its largest class probability, correct means its argmax equals the reference.

    Args:
        n_bins: confidence bins (equal width over ``[0, 1]``).
        region: ``"all"`` (every voxel of the volume; dominated by the easy background) or ``"foreground"``
            (the union of the predicted and the reference tumour: the voxels where the segmentation is decided).

    Call with ``y_pred`` = probabilities ``[K, *spatial]`` and ``y`` = the one-hot reference ``[K, *spatial]`` per
    case (decollated lists), in the same geometry. A case with no voxel in the region gives NaN (left out of the
    mean).
    """

    def __init__(self, n_bins: int = 15, region: str = "all") -> None:
        super().__init__()
        if region not in ("all", "foreground"):
            raise ValueError(f"region must be 'all' or 'foreground', got {region!r}.")
        self.n_bins = n_bins
        self.region = region

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``y_pred`` ``[1, K, *spatial]``, ``y`` ``[1, K, *spatial]`` -> ``[1, 1]``."""
        prob = y_pred.detach().float()
        pred, ref, mask = _voxels(prob, y.detach(), self.region)
        confidence = prob[0].max(0).values
        value = expected_calibration_error(confidence[mask].cpu(), (pred == ref)[mask].cpu(), self.n_bins)
        return torch.tensor([[value]])

    def aggregate(self) -> torch.Tensor:
        """The mean over cases, ignoring NaN."""
        data = self.get_buffer()
        return torch.nanmean(data) if isinstance(data, torch.Tensor) else torch.tensor(float("nan"))


class UncertaintyAUROCMetric(CumulativeIterationMetric):
    """Per-case AUROC of the voxel uncertainty for finding the wrongly segmented voxels (:func:`rank_auroc`).

    0.5 = uncertainty unrelated to errors, 1 = every wrong voxel is more uncertain than every right one.

    Args:
        region: ``"all"`` (every voxel) or ``"foreground"`` (union of predicted and reference tumour: separates
            false positives / negatives from true positives).

    Call with ``y_pred`` = ``[K + 1, *spatial]``: the class probabilities (or any scores whose argmax is the
    prediction, e.g. the one-hot mask) followed by the uncertainty map as the last channel, and ``y`` = the
    one-hot reference ``[K, *spatial]``. A case without wrong (or without right) voxels in the region gives NaN
    (undefined; left out of the mean).
    """

    def __init__(self, region: str = "all") -> None:
        super().__init__()
        if region not in ("all", "foreground"):
            raise ValueError(f"region must be 'all' or 'foreground', got {region!r}.")
        self.region = region

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``y_pred`` ``[1, K + 1, *spatial]``, ``y`` ``[1, K, *spatial]`` -> ``[1, 1]``."""
        y_pred = y_pred.detach().float()
        uncertainty = y_pred[0, -1]
        pred, ref, mask = _voxels(y_pred[:, :-1], y.detach(), self.region)
        value = rank_auroc(uncertainty[mask].cpu(), (pred != ref)[mask].cpu())
        return torch.tensor([[value]])

    def aggregate(self) -> torch.Tensor:
        """The mean over cases, ignoring NaN."""
        data = self.get_buffer()
        return torch.nanmean(data) if isinstance(data, torch.Tensor) else torch.tensor(float("nan"))


class CaseTableSaver:
    """Write one CSV table with a row per evaluated case and a column per metric (``<save_dir>/<filename>``).

    It complements ``monai.handlers.MetricsSaver`` (one ``<metric>_raw.csv`` per metric, plus summaries): the case
    names are collected from ``batch[case_key]`` at every iteration and the per-case values from the metric details
    that MONAI's metric handlers keep (``engine.state.metric_details``, the mean over classes, NaN where a metric is
    undefined). Single-process evaluation (as ``configs/evaluate.json`` runs).

    Args:
        save_dir: output folder (created).
        filename: the table's file name.
        case_key: the batch key naming each case.
    """

    def __init__(self, save_dir: str | os.PathLike, filename: str = "per_case.csv", case_key: str = "case") -> None:
        self.save_dir = os.fspath(save_dir)
        self.filename = filename
        self.case_key = case_key
        self._cases: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._cases = []

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            names = item.get(self.case_key, "")
            self._cases.extend([str(n) for n in names] if isinstance(names, (list, tuple)) else [str(names)])

    def __call__(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", {}) or {}
        columns = {
            name: torch.as_tensor(values, dtype=torch.float64).reshape(len(values), -1).nanmean(1).tolist()
            for name, values in details.items()
        }
        os.makedirs(self.save_dir, exist_ok=True)
        with open(os.path.join(self.save_dir, self.filename), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case", *columns])
            for i, case in enumerate(self._cases):
                writer.writerow([case, *(values[i] if i < len(values) else "" for values in columns.values())])
