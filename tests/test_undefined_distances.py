"""An empty prediction has no surface: its HD95 / ASD are undefined, and a mean over no defined case is NaN, not 0."""

from __future__ import annotations

import math

import torch
from monai.data import MetaTensor

from conftest import bundle_module


def _onehot(mask: torch.Tensor) -> MetaTensor:
    """A one-hot ``[2, *spatial]`` MetaTensor with 2 mm voxels."""
    return MetaTensor(torch.stack([1 - mask, mask]).float(), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))


def _cases() -> tuple[list[MetaTensor], list[MetaTensor]]:
    label = torch.zeros(8, 8, 8)
    label[2:5, 2:5, 2:5] = 1
    empty = torch.zeros(8, 8, 8)
    return [_onehot(empty), _onehot(empty)], [_onehot(label), _onehot(label)]


def test_ceds_distance_of_empty_predictions_is_nan():
    from monai.metrics import HausdorffDistanceMetric

    metrics = bundle_module("ceds_mediastinum", "metrics")
    handler = metrics.SpacingAwareMetricHandler(
        HausdorffDistanceMetric(include_background=False, percentile=95), save_details=False
    )
    handler.reset()
    handler.update(_cases())
    assert math.isnan(handler.compute())


def test_ceds_distance_is_in_mm_when_defined():
    from monai.metrics import HausdorffDistanceMetric

    metrics = bundle_module("ceds_mediastinum", "metrics")
    handler = metrics.SpacingAwareMetricHandler(
        HausdorffDistanceMetric(include_background=False, percentile=95), save_details=False
    )
    handler.reset()
    preds, labels = _cases()
    shifted = torch.zeros(8, 8, 8)
    shifted[3:6, 2:5, 2:5] = 1  # one voxel (2 mm) along the first axis
    handler.update(([_onehot(shifted)], [labels[0]]))
    assert handler.compute() == 2.0


def test_liver_distances_of_empty_predictions_are_nan():
    metrics = bundle_module("cdugjl_liver", "metrics")
    preds, labels = _cases()
    for metric in (metrics.PhysicalHausdorffDistanceMetric(include_background=False, percentile=95),
                   metrics.PhysicalSurfaceDistanceMetric(include_background=False, symmetric=True)):
        metric(torch.stack(preds), torch.stack(labels))
        assert torch.isnan(metric.aggregate()).all()
