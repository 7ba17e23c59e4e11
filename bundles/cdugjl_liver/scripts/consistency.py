"""Uncertainty-guided mean-teacher consistency (after UA-MT, Yu et al., MICCAI 2019, with evidential uncertainty).

An exponential moving average (EMA) of the student (:func:`ema_network`, updated by :class:`EMAUpdateHandler`)
predicts on a weakly augmented view of an unlabelled slice; the student predicts on a strongly augmented view of the
same slice (the spatial transforms are shared, only the intensity transforms differ, so voxels correspond). The
student's expected probabilities are pulled towards the EMA's only on the EMA's least uncertain voxels, by its
evidential uncertainty ``u = K / S`` (vacuity of its Dirichlet, in ``(0, 1]``). UA-MT (with the entropy of Monte-Carlo
dropout samples) keeps the voxels below an absolute threshold that rises over training; the range of ``u`` depends on
how much evidence the network has learnt to output, so here the ramp (:func:`kept_fraction`) sets the fraction of the
voxels of each predicted class that is kept instead (:func:`uncertainty_mask`). The weight of the term ramps up with
:func:`sigmoid_rampup`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from torch.optim.swa_utils import AveragedModel

__all__ = [
    "EMAUpdateHandler",
    "UncertaintyConsistencyLoss",
    "ema_network",
    "ema_warmup_avg_fn",
    "kept_fraction",
    "sigmoid_rampup",
    "uncertainty_mask",
    "unwrap",
]


def sigmoid_rampup(current: float, length: float) -> float:
    """The "sigmoid-shaped" ramp of Laine & Aila / UA-MT: ``exp(-5 (1 - t)^2)``, ``t = clip(current / length, 0, 1)``.

    ``length <= 0`` gives 1 (no ramp).
    """
    if length <= 0:
        return 1.0
    t = min(max(current / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


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
    uncertainty ``K / S`` is at most the ``ceil(fraction * N)``-th smallest are kept (ties included). One fraction
    per class rather than one threshold for the batch: a minority class with less evidence (the tumour) would
    otherwise be dropped first, and the consistency would then pull mainly towards the background.

    Args:
        alpha: ``[B, K, *spatial]`` Dirichlet concentrations.
        fraction: in ``(0, 1]``; ``1`` keeps every voxel.
    """
    uncertainty = alpha.shape[1] / alpha.sum(1, keepdim=True)
    if fraction >= 1.0:
        return torch.ones_like(uncertainty)
    predicted = alpha.argmax(1, keepdim=True)
    mask = torch.zeros_like(uncertainty, dtype=torch.bool)
    for label in predicted.unique():
        in_class = predicted == label
        values = uncertainty[in_class]
        threshold = values.kthvalue(max(1, math.ceil(fraction * values.numel()))).values
        mask |= in_class & (uncertainty <= threshold)
    return mask.to(alpha.dtype)


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


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (the network itself otherwise)."""
    return network.module if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else network


def ema_warmup_avg_fn(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], Any], None]:
    """``multi_avg_fn`` of ``AveragedModel`` for an EMA with the warm-up of the mean-teacher codebases.

    The ``k``-th update after the first (``num_averaged = k``) does ``ema = d ema + (1 - d) w`` with
    ``d = min(1 - 1 / (k + 1), decay)``: the EMA is the plain average of the first students, so that it does not keep
    a large share of the near-random first weights (a fixed 0.99 still holds 37 % of them after 100 updates).
    Integer buffers are copied from the student.

    Args:
        decay: the decay after the warm-up.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        if not averaged[0].is_floating_point():  # integer buffers (batch-norm counters) follow the student
            torch._foreach_copy_(averaged, current)
            return
        k = int(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(1.0 - 1.0 / (k + 1), decay))

    return update


def ema_network(network: nn.Module, decay: float = 0.99) -> AveragedModel:
    """An EMA copy of the (unwrapped) student: ``torch.optim.swa_utils.AveragedModel`` with
    :func:`ema_warmup_avg_fn`, averaging the batch-norm buffers too, in ``eval()`` mode, without gradients.

    The first :meth:`~torch.optim.swa_utils.AveragedModel.update_parameters` copies the student (so weights loaded
    after this call, e.g. a pretrained ``model.pt``, are picked up); the ``k``-th later one does
    ``ema = d ema + (1 - d) w`` with ``d = min(1 - 1 / (k + 1), decay)``.
    """
    ema = AveragedModel(unwrap(network), multi_avg_fn=ema_warmup_avg_fn(decay), use_buffers=True)
    return ema.eval().requires_grad_(False)


class EMAUpdateHandler:
    """Updates an EMA copy (:func:`ema_network`) from the student after every optimiser step.

    Args:
        ema: the ``AveragedModel``.
        network: the student (possibly DDP-wrapped); default: the engine's ``network``.
    """

    def __init__(self, ema: AveragedModel, network: nn.Module | None = None) -> None:
        self.ema = ema
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        network = self.network if self.network is not None else engine.network  # type: ignore[attr-defined]
        self.ema.update_parameters(unwrap(network))
