"""The CEDS trainer: supervised warm-up, confidence re-training and confidence-masked mean teacher.

:class:`CEDSTrainer` is the semi-supervised engine of :mod:`scripts.semi_supervised` (one iteration: labelled batch,
unlabelled batch, teacher, student, loss with explicit arguments, step) with the CEDS teacher and student passes.
:class:`CEDSSchedule` gives every iteration one of three phases; the trainer and the loss
(:class:`scripts.losses.CEDSLoss`) both read it. Every schedule is a fraction of the run's iterations, never a number
of epochs, so the phases do not move with the length of an epoch (label ratio, ``epoch_length``).

- ``warmup`` (the first ``warmup`` of the run, and every iteration in ``"supervised"`` mode): labelled patches
  only, no noise; segmentation loss (DiceCE) on the encoder and segmentation decoder, class-balanced confidence loss
  on the confidence branch.
- ``semi`` (after the warm-up, outside the re-training windows): mean teacher. The student sees the labelled
  patches as in supervised training (clean, their own batch statistics) and, in a second pass, strongly noised
  unlabelled patches that leave the batch-norm running statistics alone
  (:func:`scripts.semi_supervised.frozen_norm_statistics`); the EMA teacher sees the unlabelled patches weakly
  noised; loss = DiceCE on the labelled patches + ``w(t) * consistency`` over the unlabelled patches, where the
  consistency is masked by the teacher's confidence (``"ceds"``) or not (``"mean_teacher"``); the EMA teacher is
  updated after the step (:class:`scripts.mean_teacher.EMAUpdateHandler` when :meth:`CEDSTrainer.updates_teacher`).
  So a method differs from supervised training only by what it learns from unlabelled data: the same labelled
  inputs, the same batch-norm regime, the same segmentation updates. The authors ran one noised pass over labelled
  and unlabelled patches together and the consistency over both (``separate_norm_statistics=False``).
- ``confidence`` (periodic windows after the warm-up; ``"ceds"`` mode only): the ``semi`` step, plus the
  class-balanced confidence loss on the labelled patches, so that the confidence branch is re-trained on the
  current segmentation while the segmentation training goes on: every method gets the same number of
  segmentation updates, and no iteration trains the confidence branch alone. With ``confidence_reset``, each
  window starts from a re-initialised branch (:class:`ConfidenceResetHandler`). The teacher's confidence branch is
  the student's, copied rather than averaged (``EMAUpdateHandler(copied=...)``), so a re-trained branch masks the
  consistency at once.

One optimiser holds every parameter; the confidence branch sees detached inputs (:class:`scripts.networks.CEDSNet`),
so each phase's loss reaches only the parameters it trains, and the optimiser skips the others (their gradients are
``None``: ``optim_set_to_none``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from ignite.engine import Events
from torch.optim.swa_utils import AveragedModel

from .mean_teacher import UnlabeledStream, unwrap
from .semi_supervised import RunProgress, SemiSupervisedTrainer, frozen_norm_statistics

__all__ = ["MODES", "CEDSSchedule", "CEDSTrainer", "ConfidenceResetHandler", "add_clipped_noise", "cosine_lr_lambda"]

MODES = ("ceds", "mean_teacher", "supervised")


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


class CEDSSchedule:
    """The phase of every iteration of a CEDS run (see the module docstring).

    With ``N`` the run's iterations and ``i = iteration - 1``, the fractions become whole iterations:
    ``W = round(warmup * N)``, ``P = max(1, round(confidence_interval * N))`` and
    ``C = max(1, round(confidence_length * N))``, so that a re-training window shorter than one iteration still runs
    one. The phase is ``"warmup"`` when ``i < W`` (every iteration in ``"supervised"`` mode), else ``"confidence"``
    when ``i % P < C`` (``"ceds"`` mode, with neither ``confidence_interval`` nor ``confidence_length`` 0), else
    ``"semi"``.

    Args:
        mode: ``"ceds"``, ``"mean_teacher"`` (no confidence mask, no confidence re-training) or ``"supervised"``
            (warm-up phase in every iteration, labelled data only).
        warmup: fraction of the run, in [0, 1], that is the supervised warm-up. The paper's 400 of 8000 epochs
            is 0.05.
        confidence_interval: period of the confidence re-training, a fraction of the run in [0, 1] (the windows
            start at the iterations ``k * P + 1``; those inside the warm-up are warm-up); 0 disables the
            re-training. The paper's 1000 of 8000 epochs is 0.125.
        confidence_length: length of each re-training window, a fraction of the run in [0, 1]; 0 disables the
            re-training. The paper's 5 of 8000 epochs is 0.000625.

    Raises:
        ValueError: when ``mode`` is unknown or a fraction is outside [0, 1].

    Note:
        ``N`` comes with every :class:`scripts.semi_supervised.RunProgress`, so a run resumed with a larger
        ``max_epochs`` follows the phases re-timed to the new length, as the cosine decay of
        :func:`cosine_lr_lambda`.
    """

    def __init__(
        self,
        mode: str = "ceds",
        warmup: float = 0.05,
        confidence_interval: float = 0.125,
        confidence_length: float = 0.000625,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        fractions = {"warmup": warmup, "confidence_interval": confidence_interval,
                     "confidence_length": confidence_length}
        for name, fraction in fractions.items():
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"{name} is a fraction of the run's iterations in [0, 1], got {fraction}.")
        self.mode = mode
        self.warmup = warmup
        self.confidence_interval = confidence_interval
        self.confidence_length = confidence_length

    def phase(self, progress: RunProgress) -> str:
        """``"warmup"``, ``"confidence"`` or ``"semi"`` for the iteration of ``progress``."""
        i, total = progress.iteration - 1, progress.total
        if self.mode == "supervised" or i < round(self.warmup * total):
            return "warmup"
        if self.mode == "ceds" and self.confidence_interval > 0 and self.confidence_length > 0:
            period = max(1, round(self.confidence_interval * total))
            if i % period < max(1, round(self.confidence_length * total)):
                return "confidence"
        return "semi"


class CEDSTrainer(SemiSupervisedTrainer):
    """The CEDS trainer (see the module docstring).

    Args:
        device: device to train on (``torch.device`` or a string such as ``"cpu"``).
        max_epochs: number of epochs.
        train_data_loader: labelled data (``image`` and ``label``); one epoch is one pass over it.
        network: the student, a :class:`scripts.networks.CEDSNet` (optionally DDP-wrapped) that returns
            ``(seg_logits, confidence_logits)`` in training mode.
        optimizer: optimiser of every parameter of the student (give ``optim_set_to_none=True``, so that a phase
            does not move the parameters its loss does not reach).
        loss_function: :class:`scripts.losses.CEDSLoss` with the same ``schedule``.
        schedule: the :class:`CEDSSchedule`.
        unlabeled: unlabelled data (``image`` only, :class:`scripts.mean_teacher.UnlabeledStream`), drawn after
            the warm-up; a semi-supervised ``schedule`` needs it.
        ema: the EMA teacher (:func:`scripts.mean_teacher.ema_network`; the liver bundle's ``ema`` too); a
            semi-supervised ``schedule`` needs it.
        teacher_train_mode: run the teacher in training mode (dropout and batch statistics on, as the authors) or
            in eval mode.
        student_noise: ``(std, clip)`` of the noise on the student's unlabelled input.
        teacher_noise: ``(std, clip)`` of the noise on the teacher's input.
        separate_norm_statistics: the student's labelled and unlabelled passes as described in the module docstring
            (default); ``False``: the authors' single pass over the noised labelled and unlabelled patches (their
            batch statistics shared), with the teacher and the consistency on both.
        kwargs: other arguments of ``monai.engines.SupervisedTrainer`` (``train_handlers``, ``epoch_length``, ...).

    Raises:
        ValueError: when a semi-supervised schedule has no unlabelled data or no teacher.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        schedule: CEDSSchedule,
        unlabeled: UnlabeledStream | None = None,
        ema: AveragedModel | None = None,
        teacher_train_mode: bool = True,
        student_noise: Sequence[float] = (0.2, 0.4),
        teacher_noise: Sequence[float] = (0.05, 0.1),
        separate_norm_statistics: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, loss_function, unlabeled, **kwargs)
        if schedule.mode != "supervised" and (self.unlabeled is None or ema is None):
            raise ValueError(f"mode {schedule.mode!r} needs unlabelled data and an EMA teacher.")
        self.schedule = schedule
        self.ema = ema
        self.teacher_train_mode = teacher_train_mode
        self.student_noise = tuple(student_noise)
        self.teacher_noise = tuple(teacher_noise)
        self.separate_norm_statistics = separate_norm_statistics

    def updates_teacher(self) -> bool:
        """Whether the EMA teacher follows the student after the current iteration: after the warm-up."""
        return self.schedule.phase(RunProgress.of(self)) != "warmup"

    def draw_unlabelled(self, progress: RunProgress) -> dict[str, torch.Tensor] | None:
        """The next unlabelled batch after the warm-up, ``None`` in the warm-up."""
        return super().draw_unlabelled(progress) if self.schedule.phase(progress) != "warmup" else None

    def run_teacher(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        unlabelled: Mapping[str, torch.Tensor] | None,
        progress: RunProgress,
    ) -> dict[str, torch.Tensor] | None:
        """The EMA teacher on the weakly noised unlabelled patches (and, with ``separate_norm_statistics=False``, the
        labelled ones first) after the warm-up; called without gradients.

        Returns:
            ``{"seg": [n, C, *spatial] logits, "confidence": [n, 2, *spatial] logits}``, or ``None`` without an
            unlabelled batch.
        """
        if unlabelled is None:
            return None
        self.ema.train(self.teacher_train_mode)  # type: ignore[union-attr]
        patches = unlabelled["image"] if self.separate_norm_statistics else torch.cat([inputs, unlabelled["image"]])
        teacher_input = add_clipped_noise(patches, *self.teacher_noise)
        seg, confidence = self.ema.module.forward_with_confidence(teacher_input)  # type: ignore[union-attr]
        return {"seg": seg, "confidence": confidence}

    def run_student(
        self,
        inputs: torch.Tensor,
        unlabelled: Mapping[str, torch.Tensor] | None,
        teacher: Mapping[str, torch.Tensor] | None,
        progress: RunProgress,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """The student's ``(seg_logits, confidence_logits)`` (through the trainer's ``inferer``) on the labelled and
        on the unlabelled patches (the teacher's outputs are not needed for them).

        The clean labelled patches, as in supervised training; after the warm-up, the noised unlabelled patches in a
        second pass that leaves the batch-norm running statistics alone. With ``separate_norm_statistics=False``,
        after the warm-up one pass over the noised labelled and unlabelled patches (shared batch statistics).

        Returns:
            ``(labelled outputs, unlabelled outputs or None)``.
        """
        if self.schedule.phase(progress) == "warmup" or unlabelled is None:
            return self.inferer(inputs, self.network), None
        if self.separate_norm_statistics:
            labelled = self.inferer(inputs, self.network)
            with frozen_norm_statistics(self.network):
                noised = add_clipped_noise(unlabelled["image"], *self.student_noise)
                return labelled, self.inferer(noised, self.network)
        n = inputs.shape[0]
        both = torch.cat([inputs, unlabelled["image"]])
        seg, confidence = self.inferer(add_clipped_noise(both, *self.student_noise), self.network)
        return (seg[:n], confidence[:n]), (seg[n:], confidence[n:])


class ConfidenceResetHandler:
    """Re-initialises the student's confidence branch at the first iteration of every re-training window.

    Trained from the warm-up on, the confidence branch can settle (on the warm-up's poor segmentation) in a state
    where it gives predicted tumour an almost constant P(correct), ranking wrong voxels above right ones, which
    further training does not move; a fresh branch trained on the current segmentation with
    ``ConfidenceCELoss(balance="predicted_class")`` ranks them on its training volumes about as well as the
    network's own probability within about 100 iterations (``docs/benchmarks.md``, "Confidence mask (CEDS)"; in the
    runs measured that took re-training in every iteration after the warm-up, ``confidence_length`` equal to
    ``confidence_interval``, rather than short windows). At the
    first ``"confidence"`` iteration of each window (:meth:`CEDSSchedule.phase`; not again when a run resumes
    inside a window) the handler calls :meth:`scripts.networks.CEDSNet.reset_confidence_branch` and drops the
    optimiser's state (momentum) of the branch's parameters; with ``torch.distributed`` initialised, rank 0's fresh
    branch is broadcast to every rank. The EMA teacher copies the branch after each step
    (``EMAUpdateHandler(copied=...)``).

    Args:
        schedule: the run's :class:`CEDSSchedule`.
        enabled: whether to reset (``False``: the branch keeps training from its warm-up state, as the authors).
        network: the student (possibly DDP-wrapped); default: the engine's ``network``.
        optimizer: the optimiser holding the branch's parameters; default: the engine's ``optimizer``.
    """

    def __init__(
        self,
        schedule: CEDSSchedule,
        enabled: bool = True,
        network: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.schedule = schedule
        self.enabled = enabled
        self.network = network
        self.optimizer = optimizer

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def window_starts(self, progress: RunProgress) -> bool:
        """Whether ``progress``'s iteration is the first of a re-training window."""
        if self.schedule.phase(progress) != "confidence":
            return False
        previous = RunProgress(progress.iteration - 1, progress.total)
        return progress.iteration == 1 or self.schedule.phase(previous) != "confidence"

    def __call__(self, engine: Any) -> None:
        # ITERATION_STARTED: the state's iteration counter is already that of the coming iteration
        if not self.enabled or not self.window_starts(RunProgress.of(engine)):
            return
        student = unwrap(self.network if self.network is not None else engine.network)
        student.reset_confidence_branch()
        if dist.is_available() and dist.is_initialized():
            for module in student.confidence_branch():
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor.data, src=0)
        optimizer = self.optimizer if self.optimizer is not None else engine.optimizer
        for parameter in student.confidence_parameters():
            optimizer.state.pop(parameter, None)
