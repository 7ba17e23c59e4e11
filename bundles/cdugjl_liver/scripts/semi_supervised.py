"""The semi-supervised training engine shared by the bundles of this collection.

Each bundle is downloaded alone, so each ships this module; the copies are identical (``tests/test_common.py``).

:class:`SemiSupervisedTrainer` is a ``monai.engines.SupervisedTrainer`` whose iteration reads top to bottom:

1. ``inputs, targets = prepare_batch(labelled batch)``;
2. ``unlabelled = draw_unlabelled(progress)``: the next batch of the unlabelled stream, or ``None``;
3. ``teacher = run_teacher(inputs, targets, unlabelled, progress)`` without gradients (``None`` if there is none);
4. ``outputs, unlabelled_outputs = run_student(inputs, unlabelled, progress)``;
5. ``terms = loss_function(outputs, targets, unlabelled_outputs, teacher, progress)``: a dict holding the
   optimised total ``"loss"`` and named float terms (``"loss_seg"``, ...), all copied into ``engine.state.output``
   where handlers read them;
6. backward and optimiser step, with ``SupervisedTrainer``'s automatic mixed precision and gradient accumulation.

Each bundle subclasses it and gives its own :meth:`~SemiSupervisedTrainer.run_teacher` and
:meth:`~SemiSupervisedTrainer.run_student`; behaviour around the step (EMA updates, learning-rate schedules,
validation, logging) is attached by ignite events. ``progress`` is a :class:`RunProgress`, so that every schedule is
a fraction of the run's iterations, never a number of epochs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from .mean_teacher import UnlabeledStream

__all__ = ["RunProgress", "SemiSupervisedTrainer", "plain"]


@dataclass(frozen=True)
class RunProgress:
    """Where an iteration sits in its run: (1-based) ``iteration`` of ``total = max_epochs * epoch_length``."""

    iteration: int
    total: int

    @classmethod
    def of(cls, engine: Any) -> RunProgress:
        """The progress of ``engine``'s current iteration (``engine.state``)."""
        return cls(engine.state.iteration, engine.state.max_epochs * engine.state.epoch_length)

    @property
    def fraction(self) -> float:
        """The fraction of the run done before this iteration, ``(iteration - 1) / total``, in [0, 1)."""
        return (self.iteration - 1) / max(self.total, 1)


def plain(x: Any) -> Any:
    """``x`` as a plain ``torch.Tensor`` (a MetaTensor's array), other values unchanged."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class SemiSupervisedTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` with an unlabelled stream, a teacher and a student (see the module docstring).

    Without unlabelled data and teacher it trains exactly as ``SupervisedTrainer`` with the loss's ``"loss"``.

    Args:
        device, max_epochs, train_data_loader, network, optimizer, loss_function: as ``SupervisedTrainer``;
            ``loss_function(outputs, targets, unlabelled_outputs, teacher, progress)`` returns a dict with the
            scalar ``"loss"`` and other float terms.
        unlabeled: the unlabelled stream (:class:`scripts.mean_teacher.UnlabeledStream`); ``None`` or empty: none.
        kwargs: other arguments of ``SupervisedTrainer`` (``train_handlers``, ``prepare_batch``, ``amp``, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Any,
        unlabeled: UnlabeledStream | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            **kwargs,
        )
        self.unlabeled = unlabeled if unlabeled else None

    def draw_unlabelled(self, progress: RunProgress) -> dict[str, torch.Tensor] | None:
        """The next unlabelled batch as plain tensors on the training device, or ``None`` without a stream.

        Args:
            progress: the iteration's place in the run (subclasses may skip the draw in some phases).
        """
        if self.unlabeled is None:
            return None
        batch = self.unlabeled.next()
        return {
            k: plain(v).to(self.state.device, non_blocking=self.non_blocking)
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
        }

    def run_teacher(
        self,
        inputs: torch.Tensor,
        targets: Any,
        unlabelled: Mapping[str, torch.Tensor] | None,
        progress: RunProgress,
    ) -> Any:
        """The teacher's outputs for this iteration (run without gradients), or ``None``: no teacher here."""
        return None

    def run_student(
        self, inputs: torch.Tensor, unlabelled: Mapping[str, torch.Tensor] | None, progress: RunProgress
    ) -> tuple[Any, Any]:
        """The student's outputs on the labelled inputs and on the unlabelled batch (``None`` without one)."""
        return self.inferer(inputs, self.network), None

    def _iteration(self, engine: SemiSupervisedTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        """One iteration (see the module docstring).

        Returns:
            ``engine.state.output``: ``image``, ``label``, ``pred`` (the student's outputs on the labelled inputs)
            and the loss's dict (``loss`` and its float terms).
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs = plain(inputs)
        progress = RunProgress.of(engine)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}

        unlabelled = engine.draw_unlabelled(progress)
        with torch.no_grad():
            teacher = engine.run_teacher(inputs, targets, unlabelled, progress)

        def _compute_pred_loss() -> None:
            outputs, unlabelled_outputs = engine.run_student(inputs, unlabelled, progress)
            engine.state.output[Keys.PRED] = outputs
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = engine.loss_function(outputs, targets, unlabelled_outputs, teacher, progress)
            engine.state.output.update({k: v if k == Keys.LOSS else float(v) for k, v in terms.items()})
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        # gradient accumulation and mixed precision as in SupervisedTrainer
        acc = engine.accumulation_steps
        local = (engine.state.iteration - 1) % engine.state.epoch_length
        zero_grad = acc <= 1 or local % acc == 0
        step = acc <= 1 or (local + 1) % acc == 0 or local + 1 == engine.state.epoch_length
        engine.network.train()
        if zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                _compute_pred_loss()
            loss = engine.state.output[Keys.LOSS]
            engine.scaler.scale(loss / acc if acc > 1 else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if step:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
        else:
            _compute_pred_loss()
            loss = engine.state.output[Keys.LOSS]
            (loss / acc if acc > 1 else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if step:
                engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
