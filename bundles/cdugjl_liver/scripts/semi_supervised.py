"""The semi-supervised training engine shared by the bundles of this collection.

Each bundle is downloaded alone, so each ships this module; the copies are identical (``tests/test_common.py``).

:class:`SemiSupervisedTrainer` is a ``monai.engines.SupervisedTrainer`` whose iteration reads top to bottom:

1. ``inputs, targets = prepare_batch(labelled batch)``;
2. ``unlabelled = draw_unlabelled(progress)``: the next batch of the unlabelled stream, or ``None``;
3. ``teacher = run_teacher(inputs, targets, unlabelled, progress)`` without gradients (``None`` if there is none);
4. ``outputs, unlabelled_outputs = run_student(inputs, unlabelled, teacher, progress)``;
5. ``terms = loss_function(outputs, targets, unlabelled_outputs, teacher, progress)``: a dict holding the
   optimised total ``"loss"`` and named terms (``"loss_seg"``, ...), all copied into ``engine.state.output`` where
   handlers read them: as tensors, still attached to the graph, for the ``LOSS_COMPLETED`` handlers
   (:class:`GradientShareHandler`), as floats from then on;
6. backward and optimiser step, with ``SupervisedTrainer``'s automatic mixed precision and gradient accumulation.

Each bundle subclasses it and gives its own :meth:`~SemiSupervisedTrainer.run_teacher` and
:meth:`~SemiSupervisedTrainer.run_student`; behaviour around the step (EMA updates, learning-rate schedules,
validation, logging) is attached by ignite events. ``progress`` is a :class:`RunProgress`, so that every schedule is
a fraction of the run's iterations, never a number of epochs.

:class:`GradientShareHandler` measures what each loss term contributes to the student's gradient, so that a term
too small to act (or one that drowns the supervised loss) shows in the training log. :func:`frozen_norm_statistics`
lets a student pass over unlabelled (strongly perturbed) inputs leave the batch-norm running statistics to the
labelled inputs, as in supervised training, so that the baselines share one batch-norm regime.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from .mean_teacher import UnlabeledStream

__all__ = ["GradientShareHandler", "RunProgress", "SemiSupervisedTrainer", "frozen_norm_statistics", "plain"]


@contextmanager
def frozen_norm_statistics(network: nn.Module) -> Iterator[None]:
    """Within the context, batch-norm layers of ``network`` in train mode normalise with the batch statistics but
    leave their running statistics (and ``num_batches_tracked``) unchanged."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


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
            scalar ``"loss"`` and other scalar terms (tensors, attached to the graph where they depend on the
            student, or floats).
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
        self, inputs: torch.Tensor, unlabelled: Mapping[str, torch.Tensor] | None, teacher: Any, progress: RunProgress
    ) -> tuple[Any, Any]:
        """The student's outputs on the labelled inputs and on the unlabelled batch (``None`` without one), given the
        teacher's outputs (``teacher``, which a student may need: regions to pool over, ...)."""
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
            outputs, unlabelled_outputs = engine.run_student(inputs, unlabelled, teacher, progress)
            engine.state.output[Keys.PRED] = outputs
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = engine.loss_function(outputs, targets, unlabelled_outputs, teacher, progress)
            engine.state.output.update(terms)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            engine.state.output.update({k: torch.as_tensor(v).item() for k, v in terms.items() if k != Keys.LOSS})

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


class GradientShareHandler:
    """Each loss term's share of the student's gradient, every ``interval`` iterations.

    At ``LOSS_COMPLETED`` (before the backward pass) it computes, for every term ``t`` of ``engine.state.output``,
    the norm of ``w_t * d(L_t)/d(theta)`` over the student's trainable parameters ``theta`` (one extra backward
    pass per term) and writes ``"grad_share_<t>" = w_t |dL_t/dtheta| / (w_ref |dL_ref/dtheta|)`` into
    ``engine.state.output``, where the logging handlers find it. A share near 0 means the term does not act; the
    reference is the supervised term. A term that does not reach the student (a float, or a tensor without
    gradient) has share 0, a term missing from the output none; nothing is written when the reference has no
    gradient.

    Args:
        terms: keys of ``engine.state.output`` to measure (e.g. ``["loss_consistency"]``).
        reference: the key of the supervised term.
        weights: the weight ``w`` of a term (or of the reference) in the optimised loss: a number, or the key of
            ``engine.state.output`` that holds it (a ramped weight such as ``"consistency_weight"``); 1 otherwise.
        interval: measure at every ``interval``-th iteration; ``0`` disables the handler.
        network: the student (default: the engine's ``network``).
    """

    def __init__(
        self,
        terms: Sequence[str],
        reference: str = "loss_seg",
        weights: Mapping[str, float | str] | None = None,
        interval: int = 50,
        network: torch.nn.Module | None = None,
    ) -> None:
        self.terms = tuple(terms)
        self.reference = reference
        self.weights = dict(weights or {})
        self.interval = int(interval)
        self.network = network

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def _weight(self, output: Mapping[str, Any], term: str) -> float:
        weight = self.weights.get(term, 1.0)
        return float(output[weight]) if isinstance(weight, str) else float(weight)

    @staticmethod
    def _norm(value: Any, params: list[torch.Tensor]) -> float:
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            return 0.0
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))

    def __call__(self, engine: Any) -> None:
        if self.interval <= 0 or engine.state.iteration % self.interval != 0:
            return
        output = engine.state.output
        network = self.network if self.network is not None else engine.network
        params = [p for p in network.parameters() if p.requires_grad]
        reference = self._weight(output, self.reference) * self._norm(output.get(self.reference), params)
        if reference <= 0.0:
            return
        for term in (t for t in self.terms if t in output):
            norm = self._norm(output[term], params)
            share = self._weight(output, term) * norm / reference if norm > 0.0 else 0.0
            output[f"grad_share_{term.removeprefix('loss_')}"] = share
