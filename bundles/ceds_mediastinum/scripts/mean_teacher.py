"""Mean-teacher pieces shared by the bundles of this collection: the EMA teacher, its update, the consistency ramp
and the endless unlabelled stream.

Each bundle is downloaded alone, so each ships this module; the copies are identical (``tests/test_common.py``).

- :func:`ema_network`: the EMA teacher, a ``torch.optim.swa_utils.AveragedModel`` of the student with the warm-up
  decay of the mean-teacher codebases (:func:`ema_warmup_avg_fn`); :class:`EMAUpdateHandler` updates it.
- :func:`sigmoid_rampup`: the ramp ``exp(-5 (1 - t / L)^2)`` of the consistency weights.
- :func:`top_fraction_per_class`: a consistency mask that keeps the most trusted fraction of each predicted class.
- :class:`UnlabeledStream`: unlabelled batches drawn alongside the labelled data loader, restarted when exhausted.
- :func:`unwrap`: the network inside a ``DataParallel`` / ``DistributedDataParallel`` wrapper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.data import DataLoader
from torch.optim.swa_utils import AveragedModel

__all__ = [
    "EMAUpdateHandler",
    "UnlabeledStream",
    "ema_network",
    "ema_warmup_avg_fn",
    "sigmoid_rampup",
    "top_fraction_per_class",
    "unwrap",
]


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (the network itself otherwise)."""
    return network.module if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else network


def sigmoid_rampup(current: float, length: float) -> float:
    """The "sigmoid-shaped" ramp of Laine & Aila / UA-MT: ``exp(-5 (1 - t)^2)``, ``t = clip(current / length, 0, 1)``.

    Args:
        current: the position, in the unit of ``length`` (the trainers pass the fraction of the run done).
        length: the length of the ramp; ``length <= 0`` gives 1 (no ramp).
    """
    if length <= 0:
        return 1.0
    t = min(max(current / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def top_fraction_per_class(
    score: torch.Tensor, classes: torch.Tensor, fraction: float | Sequence[float]
) -> torch.Tensor:
    """Float mask of the highest-scoring ``fraction`` of the voxels of each class (ties with the cut kept).

    In a class of ``N`` voxels those whose score is at least the ``ceil(fraction * N)``-th largest are kept, at least
    one per class present. One fraction per class rather than one threshold for the batch: a minority class with
    lower scores (the tumour, where the teacher is less sure) would otherwise be dropped first, and the consistency
    would then pull mainly towards the background.

    Args:
        score: ``[B, 1, *spatial]``, higher = more trustworthy (e.g. a confidence, or minus an uncertainty).
        classes: ``[B, 1, *spatial]`` class of each voxel (e.g. the teacher's argmax).
        fraction: in ``(0, 1]``, for every class or one per class index; ``1`` keeps every voxel of the class.

    Returns:
        ``[B, 1, *spatial]`` mask of ``score``'s dtype.
    """
    fractions = [float(fraction)] if isinstance(fraction, (int, float)) else [float(f) for f in fraction]
    if min(fractions) >= 1.0:
        return torch.ones_like(score)
    mask = torch.zeros_like(score, dtype=torch.bool)
    for label in classes.unique():
        in_class = classes == label
        values = score[in_class]
        kept = fractions[int(label)] if len(fractions) > 1 else fractions[0]
        k = values.numel() - max(1, math.ceil(kept * values.numel())) + 1
        mask |= in_class & (score >= values.kthvalue(k).values)
    return mask.to(score.dtype)


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
    ``ema = d ema + (1 - d) w`` with ``d = min(1 - 1 / (k + 1), decay)``. The student's own methods are reached
    through ``.module``.

    Args:
        network: the student (possibly DDP-wrapped).
        decay: the decay after the warm-up.
    """
    ema = AveragedModel(unwrap(network), multi_avg_fn=ema_warmup_avg_fn(decay), use_buffers=True)
    return ema.eval().requires_grad_(False)


class EMAUpdateHandler:
    """Updates an EMA copy (:func:`ema_network`) from the student after every iteration (or those ``when`` picks).

    Args:
        ema: the ``AveragedModel``.
        network: the student (possibly DDP-wrapped); default: the engine's ``network``.
        when: ``engine -> bool``, whether to update after the engine's current iteration; default: always.
        copied: names of the student's submodules that the EMA takes over as they are (parameters and buffers)
            instead of averaging them, e.g. a branch re-trained from time to time whose new state should act at
            once.
    """

    def __init__(
        self,
        ema: AveragedModel,
        network: nn.Module | None = None,
        when: Callable[[Engine], bool] | None = None,
        copied: Sequence[str] = (),
    ) -> None:
        self.ema = ema
        self.network = network
        self.when = when
        self.copied = tuple(copied)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.when is not None and not self.when(engine):
            return
        student = unwrap(self.network if self.network is not None else engine.network)  # type: ignore[attr-defined]
        self.ema.update_parameters(student)
        for name in self.copied:
            self.ema.module.get_submodule(name).load_state_dict(student.get_submodule(name).state_dict())


class UnlabeledStream:
    """An endless source of unlabelled batches, drawn alongside the labelled data loader.

    Wraps a ``monai.data.DataLoader``; when it is exhausted it starts again (calling ``sampler.set_epoch`` with
    a pass counter, for ``DistributedSampler``). An empty dataset disables the stream: :meth:`next` returns
    ``None`` (supervised-only training, or MONAI Label with its labelled records only).

    Args:
        dataset: the unlabelled dataset.
        batch_size: volumes per batch.
        shuffle: shuffle when no ``sampler`` is given.
        sampler: e.g. a ``DistributedSampler`` (multi-GPU).
        num_workers: data loader workers.
        kwargs: further ``DataLoader`` arguments.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        shuffle: bool = True,
        sampler: Any = None,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        self.loader = None
        if len(dataset) > 0:
            self.loader = DataLoader(
                dataset,
                batch_size=batch_size,
                shuffle=shuffle and sampler is None,
                sampler=sampler,
                num_workers=num_workers,
                **kwargs,
            )
        self._iterator: Iterable | None = None
        self._passes = 0

    def __bool__(self) -> bool:
        return self.loader is not None

    def next(self) -> Any:
        """The next unlabelled batch, or ``None`` for an empty dataset."""
        if self.loader is None:
            return None
        if self._iterator is not None:
            try:
                return next(self._iterator)  # type: ignore[call-overload]
            except StopIteration:
                pass
        sampler = self.loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self._passes)
        self._passes += 1
        self._iterator = iter(self.loader)
        return next(self._iterator)  # type: ignore[call-overload]
