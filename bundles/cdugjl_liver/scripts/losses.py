"""The training losses of the liver bundle: supervised multi-task and semi-supervised CdUgJL.

Both are called by :class:`scripts.trainer.CdUgJLTrainer` with explicit arguments,
``loss(outputs, targets, unlabelled_outputs, teacher, progress)``, and return a dict: the optimised total
``"loss"`` and every unweighted term as ``"loss_<term>"`` (plus ``"consistency_weight"``), which the trainer puts into
``engine.state.output`` for the handlers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .consistency import UncertaintyConsistencyLoss, kept_fraction
from .distillation import DirichletKLLoss, FeatureDistillationLoss, RegionContrastiveLoss
from .edge import boundary_map
from .evidential import DirichletLoss, NIGLoss
from .mean_teacher import sigmoid_rampup
from .networks import field_of_view_scale
from .semi_supervised import RunProgress

__all__ = ["CdUgJLLoss", "MultiTaskLoss"]

Outputs = Mapping[str, Any]


def _weighted(terms: dict[str, torch.Tensor], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """``{"loss": sum_t weights[t] * terms[t], "loss_<t>": terms[t], ...}`` (the terms attached to the graph, for
    :class:`scripts.semi_supervised.GradientShareHandler`)."""
    total = sum(weights[name] * value for name, value in terms.items())
    return {"loss": total, **{f"loss_{name}": value for name, value in terms.items()}}


def _cat_rows(groups: Sequence[Outputs]) -> dict[str, Any]:
    """The batch rows of several ``forward_all`` dicts, concatenated (tensors and lists of tensors)."""
    first = groups[0]
    return {
        k: [torch.cat(t) for t in zip(*(g[k] for g in groups))] if isinstance(first[k], (list, tuple))
        else torch.cat([g[k] for g in groups])
        for k in first
    }


class MultiTaskLoss(nn.Module):
    """Weighted sum of the evidential segmentation, evidential quantification and edge losses of labelled slices.

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

    def supervised_terms(
        self, outputs: Outputs, targets: Mapping[str, torch.Tensor], progress: float
    ) -> dict[str, torch.Tensor]:
        """The unweighted terms ``{"seg", "quant", "edge"}`` with a non-zero weight.

        Args:
            outputs: the train-mode dict of :class:`scripts.networks.MEAMTNet` on the labelled slices.
            targets: the dict of :class:`scripts.trainer.MultiTaskPrepareBatch`.
            progress: the fraction of the run done (the KL annealing of the segmentation loss).
        """
        label = targets["label"]
        terms = {}
        if self.seg_weight:
            terms["seg"] = self.seg_loss(outputs["alpha"], label, progress)
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

    def forward(
        self,
        outputs: Outputs,
        targets: Mapping[str, torch.Tensor],
        unlabelled_outputs: Outputs | None = None,
        teacher: Mapping[str, Any] | None = None,
        progress: RunProgress | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss": weighted sum, "loss_seg": ..., ...}`` of the labelled slices (the other inputs are unused).

        Args:
            outputs: the student's train-mode dict on the labelled slices.
            targets: the dict of :class:`scripts.trainer.MultiTaskPrepareBatch`.
            unlabelled_outputs: unused (supervised training).
            teacher: unused.
            progress: the iteration's place in the run (``None``: the end of the run).
        """
        fraction = 1.0 if progress is None else progress.fraction
        terms = self.supervised_terms(outputs, targets, fraction)
        weights = {"seg": self.seg_weight, "quant": self.quant_weight, "edge": self.edge_weight}
        return _weighted(terms, weights)


class CdUgJLLoss(MultiTaskLoss):
    """CdUgJL training loss: supervised terms on labelled slices, distillation from the CE teacher, consistency.

    With the teacher outputs of :meth:`scripts.trainer.CdUgJLTrainer.run_teacher` (``"labelled"`` and
    ``"unlabelled"``: the frozen contrast-enhanced teacher on the CE phases of each batch, with the ``"regions"`` of
    its slices; ``"ema"``: the EMA student on the unlabelled weak views; each present only when it ran) and the
    student's outputs on the same slices (:class:`scripts.student.DistillationStudent`, with ``"projected"`` and
    ``"region_embeddings"`` where the teacher ran) the terms are

    * ``seg``, ``quant``, ``edge`` (labelled slices): :class:`MultiTaskLoss`;
    * ``attention``, ``feature`` (every slice the teacher saw, labelled first):
      :class:`scripts.distillation.FeatureDistillationLoss`;
    * ``distill_kl`` (the same slices): :class:`scripts.distillation.DirichletKLLoss`, ``KL(teacher || student)``;
    * ``contrast``: :class:`scripts.distillation.RegionContrastiveLoss`, computed separately for labelled and
      unlabelled slices over the teacher's ``"regions"`` of each (:meth:`scripts.trainer.CdUgJLTrainer.run_teacher`),
      then averaged;
    * ``consistency`` (unlabelled slices): :class:`scripts.consistency.UncertaintyConsistencyLoss` against the EMA
      on the weak view, masked to the ``kept_fraction(t, consistency_rampup, kept_fraction_start)`` least uncertain
      voxels of each class the EMA predicts, and weighted by ``consistency_weight * sigmoid_rampup(t,
      consistency_rampup)`` (``t``: the fraction of the run done).

    A weight of 0 removes its term (nothing is computed for it). Terms whose inputs are absent from an iteration
    (no teacher, no unlabelled data) are left out of it.

    Args:
        seg_loss, quant_loss, seg_weight, quant_weight, edge_weight: as :class:`MultiTaskLoss`.
        distillation: the feature distillation module (needed if ``attention_weight`` or ``feature_weight``).
        contrast: the region contrastive module (needed if ``contrast_weight``).
        consistency: the consistency module (default: masked, :class:`UncertaintyConsistencyLoss`).
        attention_weight: weight of the attention alignment.
        feature_weight: weight of the projected-feature matching.
        contrast_weight: weight of the region InfoNCE.
        distill_kl_weight: weight of the teacher-student Dirichlet KL.
        consistency_weight: final weight of the consistency term.
        consistency_rampup: length of the consistency weight and kept-fraction ramps, as a fraction of the run.
        kept_fraction_start: the fraction of voxels the consistency mask keeps at the start of the ramp (as UA-MT's
            0.75 of the maximum entropy).
    """

    def __init__(
        self,
        seg_loss: nn.Module | None = None,
        quant_loss: nn.Module | None = None,
        seg_weight: float = 1.0,
        quant_weight: float = 0.1,
        edge_weight: float = 0.0,
        distillation: FeatureDistillationLoss | None = None,
        contrast: RegionContrastiveLoss | None = None,
        consistency: nn.Module | None = None,
        attention_weight: float = 0.0,
        feature_weight: float = 0.0,
        contrast_weight: float = 0.0,
        distill_kl_weight: float = 0.0,
        consistency_weight: float = 0.0,
        consistency_rampup: float = 0.0,
        kept_fraction_start: float = 0.75,
    ) -> None:
        super().__init__(seg_loss, quant_loss, seg_weight, quant_weight, edge_weight)
        if (attention_weight or feature_weight) and distillation is None:
            raise ValueError("attention_weight / feature_weight need a `distillation` module.")
        if contrast_weight and contrast is None:
            raise ValueError("contrast_weight needs a `contrast` module.")
        self.distillation = distillation
        self.contrast = contrast
        self.consistency = consistency if consistency is not None else UncertaintyConsistencyLoss()
        self.kl = DirichletKLLoss()
        self.attention_weight = attention_weight
        self.feature_weight = feature_weight
        self.contrast_weight = contrast_weight
        self.distill_kl_weight = distill_kl_weight
        self.consistency_weight = consistency_weight
        self.consistency_rampup = consistency_rampup
        self.kept_fraction_start = kept_fraction_start

    def forward(
        self,
        outputs: Outputs,
        targets: Mapping[str, torch.Tensor],
        unlabelled_outputs: Outputs | None = None,
        teacher: Mapping[str, Any] | None = None,
        progress: RunProgress | None = None,
    ) -> dict[str, torch.Tensor]:
        """The weighted total and the unweighted terms (see the class docstring).

        Args:
            outputs: the student's train-mode dict on the labelled slices.
            targets: the dict of :class:`scripts.trainer.MultiTaskPrepareBatch`.
            unlabelled_outputs: the student's dict on the unlabelled strong views, or ``None``.
            teacher: the dict of :meth:`scripts.trainer.CdUgJLTrainer.run_teacher`, or ``None``.
            progress: the iteration's place in the run (``None``: the end of the run).

        Returns:
            ``{"loss", "loss_<term>" for each term computed, "consistency_weight"}``.
        """
        fraction = 1.0 if progress is None else progress.fraction
        teacher = teacher or {}
        terms = self.supervised_terms(outputs, targets, fraction)
        # (student, teacher) pairs of the slices the CE teacher saw, labelled first
        groups = [(outputs, teacher["labelled"])] if "labelled" in teacher else []
        if "unlabelled" in teacher and unlabelled_outputs is not None:
            groups.append((unlabelled_outputs, teacher["unlabelled"]))
        if groups:
            student_rows = _cat_rows([s for s, _ in groups])
            teacher_rows = _cat_rows([t for _, t in groups])
            if self.attention_weight or self.feature_weight:
                features = (student_rows["features"], teacher_rows["features"], student_rows["projected"])
                attention, feature = self.distillation(*features)  # type: ignore[misc]
                if self.attention_weight:
                    terms["attention"] = attention
                if self.feature_weight:
                    terms["feature"] = feature
            if self.distill_kl_weight:
                terms["distill_kl"] = self.kl(student_rows["alpha"], teacher_rows["alpha"])
            if self.contrast_weight:
                contrast = [self.contrast(s["region_embeddings"], s["region_valid"], t["features"], t["regions"])
                            for s, t in groups]  # type: ignore[misc]
                terms["contrast"] = torch.stack(contrast).mean()
        consistency_weight = self.consistency_weight * sigmoid_rampup(fraction, self.consistency_rampup)
        if "ema" in teacher and unlabelled_outputs is not None and self.consistency_weight:
            fraction_kept = kept_fraction(fraction, self.consistency_rampup, self.kept_fraction_start)
            terms["consistency"] = self.consistency(unlabelled_outputs["alpha"], teacher["ema"], fraction_kept)
        weights = {
            "seg": self.seg_weight,
            "quant": self.quant_weight,
            "edge": self.edge_weight,
            "attention": self.attention_weight,
            "feature": self.feature_weight,
            "contrast": self.contrast_weight,
            "distill_kl": self.distill_kl_weight,
            "consistency": consistency_weight,
        }
        return {**_weighted(terms, weights), "consistency_weight": torch.tensor(consistency_weight)}
