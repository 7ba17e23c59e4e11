"""The CEDS training engine: supervised warm-up, confidence re-training and confidence-masked mean teacher.

:class:`CEDSTrainer` is a ``monai.engines.SupervisedTrainer`` whose iteration runs one of three phases, chosen by
epoch (ignite epochs count from 1):

- ``warmup`` (epochs ``1..warmup_epochs``, and every epoch in ``"supervised"`` mode): labelled patches only, no
  noise; segmentation loss (DiceCE) on the encoder and segmentation decoder, class-balanced confidence loss on
  the confidence branch; both optimisers step.
- ``confidence`` (after the warm-up, epochs with ``epoch % confidence_interval < confidence_epochs``; ``"ceds"``
  mode only): the confidence branch alone is re-trained on the labelled patches with the student's input noise.
- ``semi`` (all other epochs): mean teacher. The batch is the labelled patches followed by unlabelled patches;
  the student sees strongly noised input, the EMA teacher weakly noised input; loss = DiceCE on the labelled part
  + ``w(epoch) * consistency`` over the whole batch, where the consistency is masked by the teacher's confidence
  (``"ceds"``) or not (``"mean_teacher"``); only the segmentation optimiser steps, then the teacher is updated.

Without unlabelled data every epoch is a warm-up epoch (supervised training).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from .losses import sigmoid_rampup

__all__ = ["MODES", "CEDSTrainer", "add_clipped_noise", "cosine_lr_lambda", "create_teacher", "ema_update", "unwrap"]

MODES = ("ceds", "mean_teacher", "supervised")

logger = logging.getLogger(__name__)


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a ``DataParallel``/``DistributedDataParallel`` wrapper, or ``network`` itself."""
    return network.module if isinstance(network, (DataParallel, DistributedDataParallel)) else network


def create_teacher(network: nn.Module) -> nn.Module:
    """A frozen deep copy of ``network`` (unwrapped from DDP) to serve as the EMA teacher."""
    teacher = copy.deepcopy(unwrap(network))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` for parameters and floating-point buffers.

    Integer buffers (batch-norm ``num_batches_tracked``) are copied.
    """
    for t, s in zip(teacher.parameters(), unwrap(student).parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), unwrap(student).buffers()):
        if t.is_floating_point():
            t.mul_(decay).add_(s, alpha=1.0 - decay)
        else:
            t.copy_(s)


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
        teacher: the EMA teacher, a copy of the student's module (:func:`create_teacher`).
        unlabeled_data_loader: unlabelled data (``image`` only), cycled; ``None`` or empty: supervised training.
        mode: ``"ceds"``, ``"mean_teacher"`` (no confidence mask, no confidence re-training) or ``"supervised"``
            (warm-up phase every epoch, labelled data only).
        warmup_epochs: number of supervised warm-up epochs.
        confidence_interval: period (epochs) of the confidence re-training.
        confidence_epochs: epochs of confidence re-training per period.
        ema_decay: EMA decay of the teacher; during the first iterations after the warm-up the decay is
            ``min(1 - 1 / (k + 1), ema_decay)`` for the ``k``-th iteration (``k = 0`` copies the student).
        teacher_train_mode: run the teacher in training mode (dropout and batch statistics on, as the authors) or
            in eval mode.
        consistency_weight: maximum weight of the consistency loss.
        consistency_rampup: length in epochs of the ``exp(-5 (1 - t / L)^2)`` ramp of the weight (``t`` = epoch
            index from 0); 0 disables the ramp.
        student_noise: ``(std, clip)`` of the student's input noise in the ``confidence`` and ``semi`` phases.
        teacher_noise: ``(std, clip)`` of the teacher's input noise.
        kwargs: other arguments of ``monai.engines.SupervisedTrainer`` (``train_handlers``, ``inferer``, ...).
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
        teacher: nn.Module | None = None,
        unlabeled_data_loader: Iterable | None = None,
        mode: str = "ceds",
        warmup_epochs: int = 400,
        confidence_interval: int = 1000,
        confidence_epochs: int = 5,
        ema_decay: float = 0.99,
        teacher_train_mode: bool = True,
        consistency_weight: float = 1.0,
        consistency_rampup: float = 8000,
        student_noise: Sequence[float] = (0.2, 0.4),
        teacher_noise: Sequence[float] = (0.05, 0.1),
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            **kwargs,
        )
        has_unlabeled = unlabeled_data_loader is not None and len(unlabeled_data_loader) > 0  # type: ignore
        if mode != "supervised" and not has_unlabeled:
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
        self.unlabeled_data_loader = unlabeled_data_loader
        self.warmup_epochs = warmup_epochs
        self.confidence_interval = confidence_interval
        self.confidence_epochs = confidence_epochs
        self.ema_decay = ema_decay
        self.teacher_train_mode = teacher_train_mode
        self.consistency_weight = consistency_weight
        self.consistency_rampup = consistency_rampup
        self.student_noise = tuple(student_noise)
        self.teacher_noise = tuple(teacher_noise)
        self._unlabeled_iter: Iterator | None = None
        self._unlabeled_pass = 0

    def phase(self, epoch: int) -> str:
        """The phase of (1-based) ``epoch``: ``"warmup"``, ``"confidence"`` or ``"semi"``."""
        if self.mode == "supervised" or epoch <= self.warmup_epochs:
            return "warmup"
        periodic = self.confidence_interval > 0 and epoch % self.confidence_interval < self.confidence_epochs
        if self.mode == "ceds" and periodic:
            return "confidence"
        return "semi"

    def _next_unlabeled(self) -> dict:
        """The next unlabelled batch, restarting (and re-seeding a ``DistributedSampler``) after each pass."""
        while True:
            if self._unlabeled_iter is None:
                sampler = getattr(self.unlabeled_data_loader, "sampler", None)
                if isinstance(sampler, DistributedSampler):
                    sampler.set_epoch(self._unlabeled_pass)
                self._unlabeled_pass += 1
                self._unlabeled_iter = iter(self.unlabeled_data_loader)  # type: ignore
            try:
                return next(self._unlabeled_iter)
            except StopIteration:
                self._unlabeled_iter = None

    def _teacher_decay(self, engine: CEDSTrainer) -> float:
        """EMA decay of the ``k``-th iteration after the warm-up: ``min(1 - 1 / (k + 1), ema_decay)``."""
        k = engine.state.iteration - 1 - self.warmup_epochs * engine.state.epoch_length
        return min(1.0 - 1.0 / (max(k, 0) + 1.0), self.ema_decay)

    def _iteration(self, engine: CEDSTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        """One iteration of the phase of the current epoch.

        Returns:
            ``engine.state.output``: ``image``, ``label``, ``pred`` (student segmentation logits of the labelled
            patches), ``loss`` (the optimised total) and the float terms ``loss_seg``, ``loss_confidence``,
            ``loss_consistency``, ``consistency_weight`` (0 when not used in the phase).
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        phase = self.phase(engine.state.epoch)
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
            unlabeled, _ = engine.prepare_batch(self._next_unlabeled(), engine.state.device, engine.non_blocking)
            both = torch.cat([inputs, unlabeled], dim=0)
            n_labeled = inputs.shape[0]
            student_seg, confidence = engine.network(add_clipped_noise(both, *self.student_noise))
            self.teacher.train(self.teacher_train_mode)  # type: ignore[union-attr]
            with torch.no_grad():
                teacher_seg, teacher_confidence = self.teacher.forward_with_confidence(  # type: ignore
                    add_clipped_noise(both, *self.teacher_noise)
                )
            seg = student_seg[:n_labeled]
            loss_seg = engine.loss_function(seg, targets)
            mask_logits = teacher_confidence if self.mode == "ceds" else None
            loss_consistency = self.consistency_loss(student_seg, teacher_seg, mask_logits)
            weight = self.consistency_weight * sigmoid_rampup(engine.state.epoch - 1, self.consistency_rampup)
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
            ema_update(self.teacher, engine.network, self._teacher_decay(engine))  # type: ignore[arg-type]
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
