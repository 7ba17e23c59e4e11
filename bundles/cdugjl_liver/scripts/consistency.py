"""Uncertainty-guided mean-teacher consistency (after UA-MT, Yu et al., MICCAI 2019, with evidential uncertainty).

An exponential moving average (EMA) of the student (:func:`scripts.mean_teacher.ema_network`, updated by
:class:`scripts.mean_teacher.EMAUpdateHandler`)
predicts on a weakly augmented view of an unlabelled slice; the student predicts on a strongly augmented view of the
same slice (the spatial transforms are shared, only the intensity transforms differ, so voxels correspond). The
student's expected probabilities are pulled towards the EMA's only on the EMA's least uncertain voxels, by its
evidential uncertainty ``u = K / S`` (vacuity of its Dirichlet, in ``(0, 1]``). UA-MT (with the entropy of Monte-Carlo
dropout samples) keeps the voxels below an absolute threshold that rises over training; the range of ``u`` depends on
how much evidence the network has learnt to output, so here the ramp (:func:`kept_fraction`) sets the fraction of the
voxels of each predicted class that is kept instead (:func:`uncertainty_mask`). The weight of the term ramps up with
:func:`scripts.mean_teacher.sigmoid_rampup`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .mean_teacher import sigmoid_rampup, top_fraction_per_class

__all__ = ["UncertaintyConsistencyLoss", "kept_fraction", "uncertainty_mask"]


def kept_fraction(current: float, length: float, start: float = 0.75) -> float:
    """UA-MT's threshold ramp, ``start + (1 - start) sigmoid_rampup(current, length)``, as a fraction of voxels kept.

    UA-MT ramps an entropy threshold from ``0.75 ln 2`` to ``ln 2`` (its maximum for two classes). An absolute
    threshold on the evidential ``u = K / S`` can keep every voxel from the first iteration (a network that outputs
    total evidence above ``K / 3`` everywhere has ``u < 0.75`` everywhere), so the ramp sets the fraction of voxels kept
    instead: ``start`` at the beginning, every voxel at the end of the ramp.
    """
    return start + (1.0 - start) * sigmoid_rampup(current, length)


def uncertainty_mask(alpha: torch.Tensor, fraction: float) -> torch.Tensor:
    """``[B, 1, *spatial]`` float mask of the least uncertain voxels of the batch, ``fraction`` of each predicted class.

    The voxels are grouped by the class of their largest concentration; in a group of ``N`` voxels those whose
    uncertainty ``K / S`` is at most the ``ceil(fraction * N)``-th smallest are kept (ties included):
    :func:`scripts.mean_teacher.top_fraction_per_class` of ``-K / S``.

    Args:
        alpha: ``[B, K, *spatial]`` Dirichlet concentrations.
        fraction: in ``(0, 1]``; ``1`` keeps every voxel.
    """
    uncertainty = alpha.shape[1] / alpha.sum(1, keepdim=True)
    return top_fraction_per_class(-uncertainty, alpha.argmax(1, keepdim=True), fraction)


class UncertaintyConsistencyLoss(nn.Module):
    """Masked mean squared difference of the expected probabilities of the student and the EMA teacher.

    ``sum_v m_v mean_k (p^s_vk - p^t_vk)^2 / sum_v m_v`` with ``p = alpha / S`` and ``m`` = :func:`uncertainty_mask`
    of the EMA's concentrations (UA-MT's ``sum(mask * mse) / (2 sum(mask))`` for two classes).

    Args:
        use_mask: ``False`` gives plain mean-teacher consistency (every voxel).
    """

    def __init__(self, use_mask: bool = True) -> None:
        super().__init__()
        self.use_mask = use_mask

    def forward(
        self, student_alpha: torch.Tensor, teacher_alpha: torch.Tensor, fraction: float = 1.0
    ) -> torch.Tensor:
        """
        Args:
            student_alpha: ``[B, K, *spatial]`` concentrations of the student on the strong view.
            teacher_alpha: ``[B, K, *spatial]`` concentrations of the EMA teacher on the weak view (detached).
            fraction: the fraction of the least uncertain teacher voxels kept (:func:`kept_fraction`).

        Returns:
            a scalar.
        """
        teacher_alpha = teacher_alpha.detach().to(student_alpha)
        p_s = student_alpha / student_alpha.sum(1, keepdim=True)
        p_t = teacher_alpha / teacher_alpha.sum(1, keepdim=True)
        squared = (p_s - p_t).pow(2).mean(1, keepdim=True)
        if not self.use_mask:
            return squared.mean()
        mask = uncertainty_mask(teacher_alpha, fraction)
        return (squared * mask).sum() / mask.sum()
