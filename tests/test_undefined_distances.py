"""HD95 / ASD in mm (``scripts/surface_metrics.py``, the same file in both bundles): each case's spacing comes from
its ``MetaTensor.pixdim``; an empty prediction has no surface, so its distances are undefined, and a mean over no
defined case is NaN, not 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from conftest import bundle_module

BUNDLES = ("cdugjl_liver", "ceds_mediastinum")


def _onehot(mask: torch.Tensor, spacing=(2.0, 2.0, 2.0)) -> MetaTensor:
    """A one-hot ``[2, *spatial]`` MetaTensor with the given voxel spacing."""
    affine = torch.tensor(np.diag([*spacing, 1.0]))
    return MetaTensor(torch.stack([1 - mask, mask]).float(), affine=affine)


def _box(rows: slice) -> torch.Tensor:
    mask = torch.zeros(10, 10, 4)
    mask[rows, 2:5, 1:3] = 1
    return mask


@pytest.mark.parametrize("bundle", BUNDLES)
def test_distances_in_mm_from_each_cases_spacing(bundle):
    """A one-voxel shift along a 3 mm axis is 3 mm, along a 2 mm axis 2 mm; an empty prediction is left out."""
    surface = bundle_module(bundle, "surface_metrics")
    reference, shifted, empty = (_onehot(_box(r), (3.0, 1.0, 5.0)) for r in (slice(2, 5), slice(3, 6), slice(0, 0)))
    other = _onehot(_box(slice(3, 6)), (2.0, 1.0, 5.0)), _onehot(_box(slice(2, 5)), (2.0, 1.0, 5.0))
    hd95 = surface.PhysicalHausdorffDistanceMetric(include_background=False, percentile=95)
    hd95([shifted, empty, other[0]], [reference, reference, other[1]])
    buffer = hd95.get_buffer()
    assert buffer[0].item() == pytest.approx(3.0) and buffer[2].item() == pytest.approx(2.0)
    assert torch.isnan(buffer[1]).all()  # undefined for an empty prediction, left out of the mean
    assert hd95.aggregate().item() == pytest.approx(2.5)
    asd = surface.PhysicalSurfaceDistanceMetric(include_background=False, symmetric=True)
    asd([shifted], [reference])
    assert 0 < asd.aggregate().item() < 3.0


@pytest.mark.parametrize("bundle", BUNDLES)
def test_mean_over_empty_predictions_is_nan_in_monai_handler(bundle):
    """Through MONAI's ``IgniteMetricHandler`` (as ``evaluate.json`` uses them): NaN when no case is defined."""
    from monai.handlers import IgniteMetricHandler

    surface = bundle_module(bundle, "surface_metrics")
    label = torch.zeros(8, 8, 8)
    label[2:5, 2:5, 2:5] = 1
    empty = torch.zeros(8, 8, 8)
    for metric in (surface.PhysicalHausdorffDistanceMetric(include_background=False, percentile=95),
                   surface.PhysicalSurfaceDistanceMetric(include_background=False, symmetric=True)):
        handler = IgniteMetricHandler(metric_fn=metric, save_details=False)
        handler.reset()
        handler.update(([_onehot(empty), _onehot(empty)], [_onehot(label), _onehot(label)]))
        assert math.isnan(handler.compute())
