"""Losses of confidence-enhanced semi-supervised segmentation (CEDS).

- :class:`ConfidenceCELoss`: class-balanced cross-entropy of the confidence head against "the argmax segmentation
  equals the label".
- :func:`sharpen`: temperature sharpening of probabilities, ``P^(1/T) / (P^(1/T) + (1 - P)^(1/T))``.
- :class:`ConfidenceMaskedConsistencyLoss`: squared error between the student's probabilities and the teacher's
  sharpened probabilities, counted only where the teacher's P(correct) exceeds a threshold.
- :class:`CEDSLoss`: the training loss of each phase of :class:`scripts.trainer.CEDSSchedule`, called by
  :class:`scripts.trainer.CEDSTrainer` with explicit arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mean_teacher import sigmoid_rampup, top_fraction_per_class
from .semi_supervised import RunProgress

__all__ = ["CEDSLoss", "ConfidenceCELoss", "ConfidenceMaskedConsistencyLoss", "MASKS", "correctness_target", "sharpen"]

# the consistency masks of ConfidenceMaskedConsistencyLoss
MASKS = ("threshold", "per_class", "probability", "random")


def sharpen(prob: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen each probability towards 0 or 1: ``P^(1/T) / (P^(1/T) + (1 - P)^(1/T))``, element-wise.

    Computed as ``sigmoid((log P - log(1 - P)) / T)``, which is the same expression without underflow.
    ``temperature = 1`` returns ``prob`` unchanged.

    Args:
        prob: probabilities in [0, 1], any shape.
        temperature: ``T > 0``; smaller is sharper.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    p = prob.clamp(1e-7, 1.0 - 1e-7)
    return torch.sigmoid((torch.log(p) - torch.log1p(-p)) / temperature)


def correctness_target(seg_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The confidence target: 1 where ``argmax(seg_logits)`` equals the label, else 0.

    Args:
        seg_logits: ``[B, C, *spatial]``.
        label: class indices ``[B, 1, *spatial]`` or ``[B, *spatial]``.

    Returns:
        ``[B, *spatial]`` long tensor.
    """
    if label.ndim == seg_logits.ndim:
        label = label[:, 0]
    return (torch.argmax(seg_logits, dim=1) == label.long()).long()


class ConfidenceCELoss(nn.Module):
    """Class-balanced cross-entropy of the confidence head against the correctness of the segmentation.

    The target of voxel ``v`` is ``1`` if ``argmax(seg_logits)[v] == label[v]`` else ``0``. Wrong voxels are weighted
    by ``n_correct / n_wrong``, correct ones by 1 (both 1 where all voxels are right or all wrong):

    - ``balance="batch"`` (the authors): one ratio over the batch. The wrong voxels are then mostly missed tumour;
      in the runs measured the head gave every voxel the segmentation calls tumour a low P(correct) (0.03-0.09),
      the wrong ones slightly higher, so it ranked them backwards (``scripts/ceds_mask_audit.py``).
    - ``balance="predicted_class"``: one ratio within each class the segmentation predicts, and the classes
      averaged, so that missed tumour no longer dominates the loss; in the runs measured the head then gave
      predicted tumour a flat P(correct) of about 0.35 (docs/benchmarks.md, "Confidence mask (CEDS)").

    Args:
        balance: ``"batch"`` or ``"predicted_class"``.
    """

    def __init__(self, balance: str = "batch") -> None:
        super().__init__()
        if balance not in ("batch", "predicted_class"):
            raise ValueError(f"balance must be 'batch' or 'predicted_class', got {balance!r}.")
        self.balance = balance

    def forward(self, confidence_logits: torch.Tensor, seg_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """
        Args:
            confidence_logits: ``[B, 2, *spatial]``.
            seg_logits: ``[B, C, *spatial]`` (not differentiated).
            label: ``[B, 1, *spatial]`` or ``[B, *spatial]`` class indices.

        Returns:
            a scalar, the weighted mean cross-entropy (averaged over the predicted classes with
            ``balance="predicted_class"``).
        """
        target = correctness_target(seg_logits.detach(), label)
        if self.balance == "batch":
            return F.cross_entropy(confidence_logits, target, weight=_balance(target, confidence_logits))
        ce = F.cross_entropy(confidence_logits, target, reduction="none")
        predicted = seg_logits.detach().argmax(1)
        per_class = []
        for c in predicted.unique():
            in_class = predicted == c
            weight = _balance(target[in_class], ce)[target[in_class]]
            per_class.append((weight * ce[in_class]).sum() / weight.sum())
        return torch.stack(per_class).mean()


def _balance(target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Class weights ``[n_correct / n_wrong, 1]`` of a correctness target; ``[1, 1]`` when it holds one value only
    (all right, or all wrong: the ratio would be undefined or 0)."""
    n_correct = int(target.sum())
    n_wrong = target.numel() - n_correct
    ratio = n_correct / n_wrong if n_correct > 0 and n_wrong > 0 else 1.0
    return torch.tensor([ratio, 1.0], dtype=like.dtype, device=like.device)


class ConfidenceMaskedConsistencyLoss(nn.Module):
    """Mean-teacher consistency restricted to voxels the teacher's confidence head deems correct.

    ``d = (softmax(student) - sharpen(softmax(teacher), T))^2`` element-wise (all classes), multiplied by a mask of
    the teacher's confidence ``c = softmax(teacher_confidence)[:, 1]`` (all ones when no confidence is given: plain
    mean teacher):

    - ``mask="threshold"`` (the authors): ``m = [c > threshold]``. The class-balanced confidence head learns that a
      tumour prediction is often wrong, so this mask can keep confident background only, and the sharpened targets
      then pull the student's tumour towards background.
    - ``mask="per_class"``: ``m`` keeps the ``kept_fraction`` most confident voxels of each class the teacher
      predicts (:func:`scripts.mean_teacher.top_fraction_per_class`), confident tumour as well as background.
    - ``mask="probability"`` and ``mask="random"``: the same per-class selection ranked by the teacher's own top
      softmax probability, or at random, instead of the confidence head (references for the head: the ablations
      ``probability_mask`` and ``random_mask``).

    Args:
        temperature: sharpening temperature ``T`` of the teacher probabilities (1 = no sharpening).
        threshold: the teacher's P(correct) above which a voxel counts (``mask="threshold"``).
        mask: ``"threshold"``, ``"per_class"``, ``"probability"`` or ``"random"``.
        kept_fraction: the fraction of each predicted class kept (every mask but ``"threshold"``), in ``(0, 1]``:
            one value for every class, or one per class (e.g. ``[0.5, 1.0]`` keeps the most confident half of the
            background and all of the teacher's tumour).
        normalization: ``"mean"``: ``sum(m * d) / d.numel()``, the mean over all voxels with masked ones counting
            as zeros (the authors' code); ``"mask"``: ``sum(m * d) / (C * sum(m))``, the mean over the kept voxels
            (UA-MT), 0 when the mask is empty.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        threshold: float = 0.5,
        normalization: str = "mean",
        mask: str = "threshold",
        kept_fraction: float | Sequence[float] = 0.5,
    ) -> None:
        super().__init__()
        if normalization not in ("mean", "mask"):
            raise ValueError(f"normalization must be 'mean' or 'mask', got {normalization!r}.")
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}.")
        fractions = [kept_fraction] if isinstance(kept_fraction, (int, float)) else list(kept_fraction)
        if not all(0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"kept_fraction must be in (0, 1] (one value, or one per class), got {kept_fraction}.")
        self.temperature = temperature
        self.threshold = threshold
        self.normalization = normalization
        self.mask = mask
        self.kept_fraction = kept_fraction

    def kept(self, teacher_logits: torch.Tensor, teacher_confidence_logits: torch.Tensor | None) -> torch.Tensor:
        """The mask of the voxels the consistency counts.

        Args:
            teacher_logits: ``[B, C, *spatial]``.
            teacher_confidence_logits: ``[B, 2, *spatial]`` or None (every voxel counts).

        Returns:
            ``[B, 1, *spatial]`` float mask of ``teacher_logits``' dtype.
        """
        teacher_logits = teacher_logits.detach()
        if teacher_confidence_logits is None:
            return torch.ones_like(teacher_logits[:, :1])
        if self.mask == "probability":
            score = torch.softmax(teacher_logits, dim=1).amax(1, keepdim=True)
        elif self.mask == "random":
            score = torch.rand_like(teacher_logits[:, :1])
        else:
            score = torch.softmax(teacher_confidence_logits.detach(), dim=1)[:, 1:2].to(teacher_logits)
        if self.mask == "threshold":
            return (score > self.threshold).to(teacher_logits)
        return top_fraction_per_class(score, teacher_logits.argmax(1, keepdim=True), self.kept_fraction)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_confidence_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            student_logits: ``[B, C, *spatial]``.
            teacher_logits: ``[B, C, *spatial]`` (no gradient flows into it).
            teacher_confidence_logits: ``[B, 2, *spatial]`` or None for no mask.

        Returns:
            a scalar.
        """
        target = sharpen(torch.softmax(teacher_logits.detach(), dim=1), self.temperature)
        dist = (torch.softmax(student_logits, dim=1) - target) ** 2
        mask = self.kept(teacher_logits, teacher_confidence_logits).to(dist)
        masked = (dist * mask).sum()
        if self.normalization == "mean":
            return masked / dist.numel()
        return masked / (mask.sum() * dist.shape[1]).clamp(min=1.0)


class CEDSLoss(nn.Module):
    """The CEDS training loss of each phase of a :class:`scripts.trainer.CEDSSchedule`.

    - ``warmup``: ``seg_loss(seg, label) + confidence_loss(confidence, seg, label)``;
    - ``semi``: ``seg_loss(seg, label) + w(t) * consistency_loss(student, teacher, teacher confidence)`` over the
      patches the teacher saw (the unlabelled ones; the labelled ones first when it saw them too), with
      ``w(t) = consistency_weight * sigmoid_rampup(t, consistency_rampup)``
      (``t``: the fraction of the run done); the teacher's confidence masks the consistency in ``"ceds"`` mode only;
    - ``confidence``: the ``semi`` loss ``+ confidence_loss(confidence, seg, label)``.

    Args:
        schedule: the run's :class:`scripts.trainer.CEDSSchedule` (also the trainer's).
        seg_loss: ``(seg_logits, label) -> scalar`` (DiceCE).
        confidence_loss: ``(confidence_logits, seg_logits, label) -> scalar`` (:class:`ConfidenceCELoss`).
        consistency_loss: ``(student_logits, teacher_logits, teacher_confidence_logits or None) -> scalar``
            (:class:`ConfidenceMaskedConsistencyLoss`).
        consistency_weight: maximum weight of the consistency loss.
        consistency_rampup: length of the ``exp(-5 (1 - t / L)^2)`` ramp of the weight, a fraction ``L`` of the
            run in [0, 1]; 1 ramps over the whole run (the paper), 0 disables the ramp.
    """

    def __init__(
        self,
        schedule: Any,
        seg_loss: Callable,
        confidence_loss: Callable,
        consistency_loss: Callable,
        consistency_weight: float = 1.0,
        consistency_rampup: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= consistency_rampup <= 1.0:
            raise ValueError(
                f"consistency_rampup is a fraction of the run's iterations in [0, 1], got {consistency_rampup}."
            )
        self.schedule = schedule
        self.seg_loss = seg_loss
        self.confidence_loss = confidence_loss
        self.consistency_loss = consistency_loss
        self.consistency_weight = consistency_weight
        self.consistency_rampup = consistency_rampup

    def forward(
        self,
        outputs: tuple[torch.Tensor, torch.Tensor],
        targets: torch.Tensor,
        unlabelled_outputs: tuple[torch.Tensor, torch.Tensor] | None,
        teacher: Mapping[str, torch.Tensor] | None,
        progress: RunProgress,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: the student's ``(seg_logits, confidence_logits)`` on the labelled patches.
            targets: the labels ``[n_l, 1, *spatial]``.
            unlabelled_outputs: the student's outputs on the unlabelled patches (``semi`` phase), or ``None``.
            teacher: :meth:`scripts.trainer.CEDSTrainer.run_teacher`'s dict on the unlabelled patches (preceded
                by the labelled ones when it has more rows than ``unlabelled_outputs``) in the ``semi`` phase, or
                ``None``.
            progress: the iteration's place in the run.

        Returns:
            ``"loss"`` (the optimised total), ``"loss_seg"``, ``"loss_confidence"``, ``"loss_consistency"`` (attached
            to the graph, for :class:`scripts.semi_supervised.GradientShareHandler`) and ``"consistency_weight"``
            (terms not used in the phase are 0).
        """
        phase = self.schedule.phase(progress)
        seg, confidence = outputs
        zero = seg.new_zeros(())
        loss_confidence, loss_consistency, weight = zero, zero, 0.0
        loss_seg = self.seg_loss(seg, targets)
        if phase == "warmup":
            loss_confidence = self.confidence_loss(confidence, seg, targets)
            loss = loss_seg + loss_confidence
        else:
            student = seg if unlabelled_outputs is None else unlabelled_outputs[0]
            if teacher["seg"].shape[0] > student.shape[0]:  # type: ignore[index]  (the authors' regime)
                student = torch.cat([seg, student])
            mask_logits = teacher["confidence"] if self.schedule.mode == "ceds" else None  # type: ignore[index]
            loss_consistency = self.consistency_loss(student, teacher["seg"], mask_logits)  # type: ignore[index]
            weight = self.consistency_weight * sigmoid_rampup(progress.fraction, self.consistency_rampup)
            loss = loss_seg + weight * loss_consistency
            if phase == "confidence":
                loss_confidence = self.confidence_loss(confidence, seg, targets)
                loss = loss + loss_confidence
        return {
            "loss": loss,
            "loss_seg": loss_seg,
            "loss_confidence": loss_confidence,
            "loss_consistency": loss_consistency,
            "consistency_weight": torch.tensor(weight),
        }
