"""The CEDS training engine: supervised warm-up, confidence re-training and confidence-masked mean teacher.

:class:`CEDSTrainer` is a ``monai.engines.SupervisedTrainer`` whose iteration runs one of three phases. Every
schedule is a fraction of the run's iterations, never a number of epochs, so the phases do not move with the length
of an epoch (label ratio, ``epoch_length``). The progress of (1-based) iteration ``n`` of a run of
``N = max_epochs * epoch_length`` iterations is ``t = (n - 1) / N``, in [0, 1); the phase boundaries are the
fractions rounded to whole iterations (:meth:`CEDSTrainer.phase`).

- ``warmup`` (``t < warmup``, and every iteration in ``"supervised"`` mode): labelled patches only, no noise;
  segmentation loss (DiceCE) on the encoder and segmentation decoder, class-balanced confidence loss on the
  confidence branch; both optimisers step.
- ``confidence`` (after the warm-up, ``t % confidence_interval < confidence_length``, each window at least one
  iteration long; ``"ceds"`` mode only): the confidence branch alone is re-trained on the labelled patches with the
  student's input noise.
- ``semi`` (all other iterations): mean teacher. The batch is the labelled patches followed by unlabelled patches;
  the student sees strongly noised input, the EMA teacher weakly noised input; loss = DiceCE on the labelled part
  + ``w(t) * consistency`` over the whole batch, where the consistency is masked by the teacher's confidence
  (``"ceds"``) or not (``"mean_teacher"``); only the segmentation optimiser steps, then the teacher is updated.

Without unlabelled data every iteration is a warm-up iteration (supervised training).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from .mean_teacher import UnlabeledStream, sigmoid_rampup, unwrap

__all__ = ["MODES", "CEDSTrainer", "add_clipped_noise", "cosine_lr_lambda"]

MODES = ("ceds", "mean_teacher", "supervised")

logger = logging.getLogger(__name__)


def add_clipped_noise(x: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """``x + clamp(N(0, std^2), -clip, clip)``; ``x`` itself when ``std`` is 0."""
    if std <= 0:
        return x
    return x + torch.clamp(torch.randn_like(x) * std, -clip, clip)


def cosine_lr_lambda(total_steps: int, base_lr: float, min_lr: float) -> Callable[[int], float]:
    """Multiplicative factor for ``torch.optim.lr_scheduler.LambdaLR``: cosine decay from ``base_lr`` to ``min_lr``.

    ``lr(t) = min_lr + (base_lr - min_lr) * (1 + cos(pi * min(t, T) / T)) / 2`` with ``T = total_steps``, the
    closed form of ``CosineAnnealingLR(T_max=T, eta_min=min_lr)``. The returned closure is not part of the
    scheduler's ``state_dict``, so a run resumed with a larger ``epochs`` follows the decay re-timed to the new
    length (``CosineAnnealingLR`` would restore the old ``T_max``).
    """
    total = max(int(total_steps), 1)

    def factor(step: int) -> float:
        t = min(step, total) / total
        return (min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))) / base_lr

    return factor


class CEDSTrainer(SupervisedTrainer):
    """Supervised trainer running the three CEDS phases (see the module docstring).

    Args:
        device: device to train on (``torch.device`` or a string such as ``"cpu"``).
        max_epochs: number of epochs.
        train_data_loader: labelled data (``image`` and ``label``); one epoch is one pass over it.
        network: the student, a :class:`scripts.networks.CEDSNet` (optionally DDP-wrapped) that returns
            ``(seg_logits, confidence_logits)`` in training mode.
        optimizer: optimiser of the encoder and segmentation decoder.
        loss_function: segmentation loss ``(seg_logits, label) -> scalar`` (DiceCE).
        confidence_optimizer: optimiser of the confidence branch.
        confidence_loss: ``(confidence_logits, seg_logits, label) -> scalar``
            (:class:`scripts.losses.ConfidenceCELoss`).
        lr_scheduler: scheduler of ``optimizer``, stepped after every step of ``optimizer``.
        confidence_lr_scheduler: scheduler of ``confidence_optimizer``, stepped after every step of it. As in the
            authors' code, each schedule advances only in the phases that step its optimiser.
        consistency_loss: ``(student_logits, teacher_logits, teacher_confidence_logits or None) -> scalar``
            (:class:`scripts.losses.ConfidenceMaskedConsistencyLoss`).
        teacher: the EMA teacher (:func:`scripts.mean_teacher.ema_network`), updated after every step of the
            ``semi`` phase; its first update copies the student, the ``k``-th later one uses the decay
            ``min(1 - 1 / (k + 1), decay)``.
        unlabeled: unlabelled data (``image`` only, :class:`scripts.mean_teacher.UnlabeledStream`); ``None`` or
            empty: supervised training.
        mode: ``"ceds"``, ``"mean_teacher"`` (no confidence mask, no confidence re-training) or ``"supervised"``
            (warm-up phase in every iteration, labelled data only).
        warmup: fraction of the run's iterations, in [0, 1], that is the supervised warm-up: the first
            ``round(warmup * N)`` iterations. The paper's 400 of 8000 epochs is 0.05.
        confidence_interval: period of the confidence re-training, a fraction of the run in [0, 1]: the windows
            start at the iterations ``k * P + 1`` with ``P = max(1, round(confidence_interval * N))``
            (``k = 0, 1, ...``; those inside the warm-up are warm-up). 0 disables the re-training. The paper's
            1000 of 8000 epochs is 0.125.
        confidence_length: length of each re-training window, a fraction of the run in [0, 1]:
            ``max(1, round(confidence_length * N))`` iterations, so a window shorter than one iteration still
            runs one; 0 disables the re-training. The paper's 5 of 8000 epochs is 0.000625.
        teacher_train_mode: run the teacher in training mode (dropout and batch statistics on, as the authors) or
            in eval mode.
        consistency_weight: maximum weight of the consistency loss.
        consistency_rampup: length of the ``exp(-5 (1 - t / L)^2)`` ramp of the weight, a fraction ``L`` of the
            run in [0, 1] (``t`` is the progress, see the module docstring); 1 ramps over the whole run (the
            paper), 0 disables the ramp.
        student_noise: ``(std, clip)`` of the student's input noise in the ``confidence`` and ``semi`` phases.
        teacher_noise: ``(std, clip)`` of the teacher's input noise.
        kwargs: other arguments of ``monai.engines.SupervisedTrainer`` (``train_handlers``, ``inferer``,
            ``epoch_length``, ...).

    Raises:
        ValueError: when ``mode`` is unknown, a semi-supervised mode has no teacher, or a schedule fraction is
            outside [0, 1].

    Note:
        ``N`` is read from ``engine.state`` at every iteration, so a run resumed with a larger ``max_epochs`` follows
        the schedules re-timed to the new length, as the cosine decay of :func:`cosine_lr_lambda`.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        confidence_optimizer: torch.optim.Optimizer,
        confidence_loss: Callable,
        consistency_loss: Callable,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        confidence_lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        teacher: AveragedModel | None = None,
        unlabeled: UnlabeledStream | None = None,
        mode: str = "ceds",
        warmup: float = 0.05,
        confidence_interval: float = 0.125,
        confidence_length: float = 0.000625,
        teacher_train_mode: bool = True,
        consistency_weight: float = 1.0,
        consistency_rampup: float = 1.0,
        student_noise: Sequence[float] = (0.2, 0.4),
        teacher_noise: Sequence[float] = (0.05, 0.1),
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        schedule = {"warmup": warmup, "confidence_interval": confidence_interval,
                    "confidence_length": confidence_length, "consistency_rampup": consistency_rampup}
        for name, fraction in schedule.items():
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"{name} is a fraction of the run's iterations in [0, 1], got {fraction}.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            **kwargs,
        )
        if mode != "supervised" and not unlabeled:
            logger.warning(f"mode {mode!r} without unlabelled data: training supervised only.")
            mode = "supervised"
        if mode != "supervised" and teacher is None:
            raise ValueError(f"mode {mode!r} needs a teacher network.")
        self.mode = mode
        self.confidence_optimizer = confidence_optimizer
        self.confidence_loss = confidence_loss
        self.lr_scheduler = lr_scheduler
        self.confidence_lr_scheduler = confidence_lr_scheduler
        self.consistency_loss = consistency_loss
        self.teacher = teacher
        self.unlabeled = unlabeled
        self.warmup = warmup
        self.confidence_interval = confidence_interval
        self.confidence_length = confidence_length
        self.teacher_train_mode = teacher_train_mode
        self.consistency_weight = consistency_weight
        self.consistency_rampup = consistency_rampup
        self.student_noise = tuple(student_noise)
        self.teacher_noise = tuple(teacher_noise)

    def _warmup_iterations(self, total: int) -> int:
        """The number of warm-up iterations of a run of ``total`` iterations: ``round(warmup * total)``."""
        return round(self.warmup * total)

    def phase(self, iteration: int, total: int) -> str:
        """The phase of (1-based) ``iteration`` in a run of ``total`` iterations.

        The fractions become whole iterations: ``W = round(warmup * total)``,
        ``P = max(1, round(confidence_interval * total))`` and ``C = max(1, round(confidence_length * total))``, so
        that a re-training window shorter than one iteration still runs one. With ``i = iteration - 1`` the phase
        is ``"warmup"`` when ``i < W`` (every iteration in ``"supervised"`` mode), else ``"confidence"`` when
        ``i % P < C`` (``"ceds"`` mode, with neither ``confidence_interval`` nor ``confidence_length`` 0), else
        ``"semi"``.

        Args:
            iteration: the iteration, from 1 (``engine.state.iteration``).
            total: the iterations of the run (``engine.state.max_epochs * engine.state.epoch_length``).

        Returns:
            ``"warmup"``, ``"confidence"`` or ``"semi"``.
        """
        i = iteration - 1
        if self.mode == "supervised" or i < self._warmup_iterations(total):
            return "warmup"
        if self.mode == "ceds" and self.confidence_interval > 0 and self.confidence_length > 0:
            period = max(1, round(self.confidence_interval * total))
            if i % period < max(1, round(self.confidence_length * total)):
                return "confidence"
        return "semi"

    def _iteration(self, engine: CEDSTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        """One training iteration, in the phase that :meth:`phase` gives to ``engine.state.iteration``.

        Returns:
            ``engine.state.output``: ``image``, ``label``, ``pred`` (student segmentation logits of the labelled
            patches), ``loss`` (the optimised total) and the float terms ``loss_seg``, ``loss_confidence``,
            ``loss_consistency``, ``consistency_weight`` (0 when not used in the phase).
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        iteration, total = engine.state.iteration, engine.state.max_epochs * engine.state.epoch_length
        phase = self.phase(iteration, total)
        engine.network.train()
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        zero = torch.zeros((), device=inputs.device)
        loss_seg, loss_confidence, loss_consistency, weight = zero, zero, zero, 0.0

        if phase == "warmup":
            seg, confidence = engine.network(inputs)
            loss_seg = engine.loss_function(seg, targets)
            loss_confidence = self.confidence_loss(confidence, seg, targets)
            loss = loss_seg + loss_confidence
            steps = [(engine.optimizer, self.lr_scheduler), (self.confidence_optimizer, self.confidence_lr_scheduler)]
        elif phase == "confidence":
            seg, confidence = engine.network(add_clipped_noise(inputs, *self.student_noise))
            loss_confidence = self.confidence_loss(confidence, seg, targets)
            loss = loss_confidence
            steps = [(self.confidence_optimizer, self.confidence_lr_scheduler)]
        else:
            unlabeled, _ = engine.prepare_batch(self.unlabeled.next(), engine.state.device, engine.non_blocking)  # type: ignore
            both = torch.cat([inputs, unlabeled], dim=0)
            n_labeled = inputs.shape[0]
            student_seg, confidence = engine.network(add_clipped_noise(both, *self.student_noise))
            self.teacher.train(self.teacher_train_mode)  # type: ignore[union-attr]
            with torch.no_grad():
                teacher_seg, teacher_confidence = self.teacher.module.forward_with_confidence(  # type: ignore
                    add_clipped_noise(both, *self.teacher_noise)
                )
            seg = student_seg[:n_labeled]
            loss_seg = engine.loss_function(seg, targets)
            mask_logits = teacher_confidence if self.mode == "ceds" else None
            loss_consistency = self.consistency_loss(student_seg, teacher_seg, mask_logits)
            progress = (iteration - 1) / total
            weight = self.consistency_weight * sigmoid_rampup(progress, self.consistency_rampup)
            loss = loss_seg + weight * loss_consistency
            steps = [(engine.optimizer, self.lr_scheduler)]
        engine.state.output[Keys.PRED] = seg
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        if isinstance(engine.network, DistributedDataParallel):
            # DDP expects a gradient for every parameter that produced an output; tie the unused outputs in
            loss = loss + 0.0 * (seg.sum() + confidence.sum())
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        self.confidence_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        for optimizer, scheduler in steps:
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        if phase == "semi":
            self.teacher.update_parameters(unwrap(engine.network))  # type: ignore[union-attr]
        engine.state.output.update(
            {
                "loss_seg": float(loss_seg.detach()),
                "loss_confidence": float(loss_confidence.detach()),
                "loss_consistency": float(loss_consistency.detach()),
                "consistency_weight": float(weight),
            }
        )
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
