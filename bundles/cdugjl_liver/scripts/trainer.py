"""The liver bundle's trainer: :class:`CdUgJLTrainer`, the semi-supervised engine of :mod:`scripts.semi_supervised`
with the CdUgJL teacher and student passes, and the batch preparation of its labelled slices.

One iteration (:class:`scripts.semi_supervised.SemiSupervisedTrainer`): the labelled slices and their targets
(:class:`MultiTaskPrepareBatch`); an unlabelled batch (weak view ``"image"``, strong view ``"strong"``, CE phases
``"ce"``); without gradients, the frozen contrast-enhanced teacher on the CE phases of both batches, with the
regions of the region contrast, and the EMA student on the weak views (:meth:`CdUgJLTrainer.run_teacher`); the
student with its distillation heads (:class:`scripts.student.DistillationStudent`) on the labelled slices and on
the strong views, in two passes (:meth:`CdUgJLTrainer.run_student`); the loss (:class:`scripts.losses.CdUgJLLoss`)
with all of them as arguments; the step. The EMA follows the student through
:class:`scripts.mean_teacher.EMAUpdateHandler`.
Without unlabelled data and teacher (the teacher run, ``configs/train_teacher.json``; supervised runs) it is
supervised training.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.engines.utils import PrepareBatch

from .case_meta import voxel_spacing
from .distillation import IGNORE, region_map, teacher_region_map
from .semi_supervised import RunProgress, SemiSupervisedTrainer, frozen_norm_statistics, plain

__all__ = ["CdUgJLTrainer", "MultiTaskPrepareBatch"]

logger = logging.getLogger(__name__)


class MultiTaskPrepareBatch(PrepareBatch):
    """Batch of 2D slices -> ``(image, targets)`` for :class:`scripts.losses.MultiTaskLoss`.

    ``targets`` holds ``"label"`` ``[B, 1, H, W]``, ``"quant"`` ``[B, 3]`` (centre along axis 0 and 1 in mm, area in
    mm^2, from :class:`scripts.transforms.QuantificationTargetsd`), ``"quant_mask"`` ``[B, 3]``, ``"spacing"``
    ``[B, 2]`` and, for :class:`CdUgJLTrainer`, ``"organs"`` and the contrast-enhanced phases ``"ce"`` (the
    teacher's input); keys absent from the batch, or not tensors there (file names), are left out.

    Args:
        image_key: the input key.
        target_keys: the keys copied into ``targets``.
    """

    def __init__(
        self, image_key: str = "image", target_keys: Sequence[str] = ("label", "quant", "quant_mask", "organs", "ce")
    ) -> None:
        self.image_key = image_key
        self.target_keys = tuple(target_keys)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = batchdata[self.image_key]
        targets = {
            k: plain(batchdata[k]).to(device=device, non_blocking=non_blocking)
            for k in self.target_keys
            if isinstance(batchdata.get(k), torch.Tensor)
        }
        targets["spacing"] = voxel_spacing(image).to(device=device, dtype=torch.float32)
        return image.to(device=device, non_blocking=non_blocking, **kwargs), targets



class CdUgJLTrainer(SemiSupervisedTrainer):
    """The CdUgJL semi-supervised trainer (see the module docstring).

    Args:
        device, max_epochs, train_data_loader, network, optimizer, loss_function, unlabeled: as
            :class:`scripts.semi_supervised.SemiSupervisedTrainer`; ``network`` is the student with its distillation
            heads (:class:`scripts.student.DistillationStudent`, or DDP of it), ``prepare_batch`` should be a
            :class:`MultiTaskPrepareBatch`.
        teacher: the frozen CE teacher (:class:`scripts.distillation.FrozenTeacher`), or ``None``; a teacher whose
            ``enabled`` attribute is ``False`` counts as none. Batches without ``"ce"`` are skipped by it (a warning
            is logged once per stream).
        ema: the EMA student (:func:`scripts.mean_teacher.ema_network`) run on the unlabelled weak views, or
            ``None``.
        separate_norm_statistics: run the labelled slices and the strong views in two passes, so that the strong
            views neither share the batch-norm statistics of the labelled slices nor enter the running statistics
            used at inference (:func:`frozen_norm_statistics`); ``False`` runs one pass over both (the
            ``one_pass_batch_norm`` ablation of the repository's ``scripts/benchmark_accuracy.py``, which on the
            liver phantoms costs most of the test Dice).
        region_kept_fraction: the fraction of each class the teacher predicts on unlabelled slices that gets a region
            of the region contrast (the least uncertain ones, :func:`scripts.distillation.teacher_region_map`).
        strong_key: the strong view of the unlabelled batch.
        ce_key: the contrast-enhanced phases (labelled ``targets`` and unlabelled batch).
        kwargs: other arguments of ``SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Any,
        unlabeled: Any = None,
        teacher: nn.Module | None = None,
        ema: nn.Module | None = None,
        separate_norm_statistics: bool = True,
        region_kept_fraction: float = 0.9,
        strong_key: str = "strong",
        ce_key: str = "ce",
        **kwargs: Any,
    ) -> None:
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, loss_function, unlabeled, **kwargs)
        self.teacher = teacher if teacher is not None and getattr(teacher, "enabled", True) else None
        self.ema = ema
        self.separate_norm_statistics = separate_norm_statistics
        self.region_kept_fraction = region_kept_fraction
        self.strong_key = strong_key
        self.ce_key = ce_key
        self._warned: set[str] = set()

    def _ce(self, batch: Mapping[str, torch.Tensor], stream: str) -> torch.Tensor | None:
        """The CE phases of a batch, or ``None`` (with a warning, once per stream) when it has none."""
        if self.ce_key in batch:
            return batch[self.ce_key]
        if stream not in self._warned:
            self._warned.add(stream)
            logger.warning(
                f"{stream} records have no '{self.ce_key}' (contrast-enhanced images): the teacher's distillation "
                f"terms are skipped for them."
            )
        return None

    def run_teacher(
        self,
        inputs: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        unlabelled: Mapping[str, torch.Tensor] | None,
        progress: RunProgress,
    ) -> dict[str, Any]:
        """The teachers' outputs (called without gradients).

        Returns:
            ``"labelled"`` / ``"unlabelled"``: the frozen CE teacher's ``forward_all`` dict on the CE phases of the
            labelled / unlabelled batch, with ``"regions"`` ``[n, H, W]``, the region ids of the region contrast
            (labelled: from the label, and the liver from ``"organs"`` when present,
            :func:`scripts.distillation.region_map`; unlabelled: from the teacher's prediction, the
            ``region_kept_fraction`` least uncertain voxels of each predicted class,
            :func:`scripts.distillation.teacher_region_map`); ``"ema"``: the EMA student's concentrations
            ``[n_u, K, H, W]`` on the unlabelled weak views. Each is present only when its network and inputs are.
        """
        outputs: dict[str, Any] = {}
        if self.teacher is not None:
            ce = self._ce(targets, "labelled")
            if ce is not None:
                regions = region_map(targets["label"], targets.get("organs"))
                outputs["labelled"] = {**self.teacher.forward_all(ce), "regions": regions}
            ce = None if unlabelled is None else self._ce(unlabelled, "unlabelled")
            if ce is not None:
                seen = self.teacher.forward_all(ce)
                regions = teacher_region_map(seen["alpha"], self.region_kept_fraction)  # type: ignore[arg-type]
                outputs["unlabelled"] = {**seen, "regions": regions}
        if self.ema is not None and unlabelled is not None:
            outputs["ema"] = self.ema(unlabelled["image"])
        return outputs

    def run_student(
        self,
        inputs: torch.Tensor,
        unlabelled: Mapping[str, torch.Tensor] | None,
        teacher: Mapping[str, Any],
        progress: RunProgress,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The student's outputs (through the trainer's ``inferer``) on the labelled slices and on the unlabelled
        strong views; for the slices the CE teacher saw, with the projected features and the region embeddings over
        the teacher's ``"regions"`` (:class:`scripts.student.DistillationStudent`).

        Returns:
            ``(labelled outputs, unlabelled outputs or None)``.
        """
        labelled_heads = _heads(teacher.get("labelled"))
        if unlabelled is None:
            return self.inferer(inputs, self.network, **labelled_heads), None
        strong = unlabelled[self.strong_key]
        unlabelled_heads = _heads(teacher.get("unlabelled"))
        if not self.separate_norm_statistics:
            n = inputs.shape[0]
            heads = _joined(labelled_heads, unlabelled_heads, inputs, strong)
            both = self.inferer(torch.cat([inputs, strong]), self.network, **heads)
            return _rows(both, slice(0, n)), _rows(both, slice(n, None))
        labelled = self.inferer(inputs, self.network, **labelled_heads)
        with frozen_norm_statistics(self.network):
            return labelled, self.inferer(strong, self.network, **unlabelled_heads)


def _heads(teacher: Mapping[str, Any] | None) -> dict[str, Any]:
    """The distillation heads' arguments of :class:`scripts.student.DistillationStudent` for slices the CE teacher
    saw (``teacher``: its outputs with ``"regions"``), none for others."""
    return {} if teacher is None else {"project": True, "regions": teacher["regions"]}


def _joined(
    first: Mapping[str, Any], second: Mapping[str, Any], first_inputs: torch.Tensor, second_inputs: torch.Tensor
) -> dict[str, Any]:
    """The heads' arguments (:func:`_heads`) of two batches run as one pass: the heads run when either batch asks,
    and the rows of a batch that does not ask get no region (``IGNORE``)."""
    if not first and not second:
        return {}
    regions = [
        h["regions"] if h else torch.full((x.shape[0], *x.shape[2:]), IGNORE, dtype=torch.long, device=x.device)
        for h, x in ((first, first_inputs), (second, second_inputs))
    ]
    return {"project": True, "regions": torch.cat(regions)}


def _rows(outputs: Mapping[str, Any], rows: slice) -> dict[str, Any]:
    """The batch rows ``rows`` of every tensor (and list of tensors) of the student's outputs."""
    return {k: [t[rows] for t in v] if isinstance(v, (list, tuple)) else v[rows] for k, v in outputs.items()}
