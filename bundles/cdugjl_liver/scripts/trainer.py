"""Supervised multi-task training pieces for MONAI's ``SupervisedTrainer``.

The network returns a dictionary in train mode (:meth:`scripts.networks.MEAMTNet.forward_all`), so
:class:`MultiTaskPrepareBatch` hands the trainer a dictionary of targets and :class:`MultiTaskLoss` combines the
terms as a weighted sum (each weight a config key; 0 disables a term).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch

from .edge import boundary_map
from .evidential import DirichletLoss, NIGLoss
from .networks import field_of_view_scale

__all__ = ["EpochAnnealingHandler", "MultiTaskLoss", "MultiTaskPrepareBatch", "slice_spacing"]


def slice_spacing(image: torch.Tensor) -> torch.Tensor:
    """``[B, 2]`` in-plane pixel spacing (mm) of a batch of 2D slices from its MetaTensor affine (ones otherwise)."""
    if not isinstance(image, MetaTensor):
        return torch.ones(image.shape[0], 2)
    affine = torch.as_tensor(image.affine, dtype=torch.float32)
    if affine.ndim == 2:
        affine = affine.expand(image.shape[0], -1, -1)
    return torch.linalg.norm(affine[:, :2, :2], dim=1)


class MultiTaskPrepareBatch(PrepareBatch):
    """Batch of 2D slices -> ``(image, targets)`` for :class:`MultiTaskLoss`.

    ``targets`` holds ``"label"`` ``[B, 1, H, W]``, ``"quant"`` ``[B, 3]`` (centre along axis 0 and 1 in mm, area in
    mm^2, from :class:`scripts.transforms.QuantificationTargetsd`), ``"quant_mask"`` ``[B, 3]`` and ``"spacing"``
    ``[B, 2]``; keys absent from the batch are left out.

    Args:
        image_key: the input key.
        target_keys: the keys copied into ``targets``.
    """

    def __init__(self, image_key: str = "image", target_keys: Sequence[str] = ("label", "quant", "quant_mask")):
        self.image_key = image_key
        self.target_keys = tuple(target_keys)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = batchdata[self.image_key]
        targets = {
            k: batchdata[k].to(device=device, non_blocking=non_blocking) for k in self.target_keys if k in batchdata
        }
        targets["spacing"] = slice_spacing(image).to(device=device)
        return image.to(device=device, non_blocking=non_blocking, **kwargs), targets


class MultiTaskLoss(nn.Module):
    """Weighted sum of the evidential segmentation, evidential quantification and edge losses.

    ``seg_weight * seg_loss(alpha, label) + quant_weight * quant_loss(quant, quant_target / fov, mask)
    + edge_weight * mean_i BCE(edges_i, maxpool(mask - erode(mask)))``; the quantification targets (mm, mm^2) are
    divided by the field of view of the input (:func:`scripts.networks.field_of_view_scale`), the units of the
    network's head.

    Args:
        seg_loss: a :class:`scripts.evidential.DirichletLoss` (default: Sensoy MSE + annealed KL).
        quant_loss: a :class:`scripts.evidential.NIGLoss`.
        seg_weight: weight of the segmentation term.
        quant_weight: weight of the quantification term (0 disables it).
        edge_weight: weight of the edge-map term (0 disables it).

    The current epoch (for the KL annealing) is set through :attr:`epoch`.
    """

    def __init__(
        self,
        seg_loss: nn.Module | None = None,
        quant_loss: nn.Module | None = None,
        seg_weight: float = 1.0,
        quant_weight: float = 0.1,
        edge_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.seg_loss = seg_loss if seg_loss is not None else DirichletLoss()
        self.quant_loss = quant_loss if quant_loss is not None else NIGLoss()
        self.seg_weight = seg_weight
        self.quant_weight = quant_weight
        self.edge_weight = edge_weight

    @property
    def epoch(self) -> int:
        """Completed epochs, forwarded to the segmentation loss's KL annealing."""
        return getattr(self.seg_loss, "epoch", 0)

    @epoch.setter
    def epoch(self, value: int) -> None:
        if hasattr(self.seg_loss, "epoch"):
            self.seg_loss.epoch = value

    def terms(self, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unweighted terms ``{"seg", "quant", "edge"}`` (those with a non-zero weight).

        Args:
            outputs: the train-mode dict of :class:`scripts.networks.MEAMTNet`.
            targets: the dict of :class:`MultiTaskPrepareBatch`.
        """
        label = targets["label"]
        terms = {}
        if self.seg_weight:
            terms["seg"] = self.seg_loss(outputs["alpha"], label)
        if self.quant_weight:
            spacing = targets["spacing"].to(outputs["quant"])
            scale = field_of_view_scale(spacing, outputs["alpha"].shape[2:])
            target = targets["quant"].to(scale) / scale
            terms["quant"] = self.quant_loss(outputs["quant"], target, targets["quant_mask"])
        if self.edge_weight:
            boundary = boundary_map(label)
            pool = F.adaptive_max_pool2d if boundary.ndim == 4 else F.adaptive_max_pool3d
            bce = [
                F.binary_cross_entropy_with_logits(edge, pool(boundary, edge.shape[2:])) for edge in outputs["edges"]
            ]
            terms["edge"] = torch.stack(bce).mean()
        return terms

    def forward(self, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of :meth:`terms` (a scalar)."""
        weights = {"seg": self.seg_weight, "quant": self.quant_weight, "edge": self.edge_weight}
        return sum(weights[name] * value for name, value in self.terms(outputs, targets).items())


class EpochAnnealingHandler:
    """Sets ``loss.epoch`` to the number of completed epochs when each epoch starts (KL annealing of Sensoy et al.).

    Args:
        loss: a module with an ``epoch`` attribute (:class:`MultiTaskLoss`, :class:`scripts.evidential.DirichletLoss`).
    """

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.loss.epoch = engine.state.epoch - 1
