"""Training pieces for MONAI's ``SupervisedTrainer``: supervised multi-task and semi-supervised CdUgJL.

The network returns a dictionary in train mode (:meth:`scripts.networks.MEAMTNet.forward_all`), so
:class:`MultiTaskPrepareBatch` hands the trainer a dictionary of targets and :class:`MultiTaskLoss` combines the
terms as a weighted sum (each weight a config key; 0 disables a term).

Semi-supervised training (``configs/train.json``) keeps ``SupervisedTrainer`` and its iteration and changes what
goes in and out of it:

* :class:`SemiSupervisedPrepareBatch` draws an unlabelled batch (:class:`scripts.mean_teacher.UnlabeledStream`) for every labelled one,
  runs the frozen contrast-enhanced teacher on the CE phases and the EMA student on the weak view (no gradients),
  and gives the trainer the student's input ``cat([labelled image, unlabelled strong view])`` with those outputs
  as targets;
* :class:`LabelledUnlabelledInferer` runs the student on the labelled and the unlabelled rows in two forward passes,
  so the strong views never enter the batch-norm statistics of the labelled slices or the running statistics used
  at inference;
* :class:`SemiSupervisedLoss` splits the student's outputs again and adds the distillation
  (:mod:`scripts.distillation`) and consistency (:mod:`scripts.consistency`) terms to the supervised ones;
* :class:`RunProgressHandler` gives the loss the run's progress (KL annealing, ramps: fractions of the run),
  :class:`scripts.mean_teacher.EMAUpdateHandler` updates the EMA after each step, and
  :class:`AllReduceGradientsHandler` averages the gradients of the loss's own trainable heads across processes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.inferers import Inferer

from .consistency import UncertaintyConsistencyLoss, kept_fraction
from .distillation import (
    DirichletKLLoss,
    FeatureDistillationLoss,
    RegionContrastiveLoss,
    region_map,
    teacher_region_map,
)
from .edge import boundary_map
from .evidential import DirichletLoss, NIGLoss
from .mean_teacher import UnlabeledStream, sigmoid_rampup
from .networks import field_of_view_scale

__all__ = [
    "AllReduceGradientsHandler",
    "LabelledUnlabelledInferer",
    "MultiTaskLoss",
    "MultiTaskPrepareBatch",
    "RunProgressHandler",
    "SemiSupervisedLoss",
    "SemiSupervisedPrepareBatch",
    "slice_spacing",
]

logger = logging.getLogger(__name__)


def slice_spacing(image: torch.Tensor) -> torch.Tensor:
    """``[B, 2]`` in-plane pixel spacing (mm) of a batch of 2D slices from its MetaTensor affine (ones otherwise)."""
    if not isinstance(image, MetaTensor):
        return torch.ones(image.shape[0], 2)
    affine = torch.as_tensor(image.affine, dtype=torch.float32)
    if affine.ndim == 2:
        affine = affine.expand(image.shape[0], -1, -1)
    return torch.linalg.norm(affine[:, :2, :2], dim=1)


class MultiTaskPrepareBatch(PrepareBatch):
    """Batch of 2D slices -> ``(image, targets)`` for :class:`MultiTaskLoss`.

    ``targets`` holds ``"label"`` ``[B, 1, H, W]``, ``"quant"`` ``[B, 3]`` (centre along axis 0 and 1 in mm, area in
    mm^2, from :class:`scripts.transforms.QuantificationTargetsd`), ``"quant_mask"`` ``[B, 3]`` and ``"spacing"``
    ``[B, 2]``; keys absent from the batch are left out.

    Args:
        image_key: the input key.
        target_keys: the keys copied into ``targets``.
    """

    def __init__(self, image_key: str = "image", target_keys: Sequence[str] = ("label", "quant", "quant_mask")):
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
            k: batchdata[k].to(device=device, non_blocking=non_blocking) for k in self.target_keys if k in batchdata
        }
        targets["spacing"] = slice_spacing(image).to(device=device)
        return image.to(device=device, non_blocking=non_blocking, **kwargs), targets


class MultiTaskLoss(nn.Module):
    """Weighted sum of the evidential segmentation, evidential quantification and edge losses.

    ``seg_weight * seg_loss(alpha, label) + quant_weight * quant_loss(quant, quant_target / fov, mask)
    + edge_weight * mean_i BCE(edges_i, maxpool(mask - erode(mask)))``; the quantification targets (mm, mm^2) are
    divided by the field of view of the input (:func:`scripts.networks.field_of_view_scale`), the units of the
    network's head.

    Args:
        seg_loss: a :class:`scripts.evidential.DirichletLoss` (default: Sensoy MSE + annealed KL).
        quant_loss: a :class:`scripts.evidential.NIGLoss`.
        seg_weight: weight of the segmentation term.
        quant_weight: weight of the quantification term (0 disables it).
        edge_weight: weight of the edge-map term (0 disables it).

    The run's progress (for the KL annealing) is set through :attr:`progress`.
    """

    def __init__(
        self,
        seg_loss: nn.Module | None = None,
        quant_loss: nn.Module | None = None,
        seg_weight: float = 1.0,
        quant_weight: float = 0.1,
        edge_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.seg_loss = seg_loss if seg_loss is not None else DirichletLoss()
        self.quant_loss = quant_loss if quant_loss is not None else NIGLoss()
        self.seg_weight = seg_weight
        self.quant_weight = quant_weight
        self.edge_weight = edge_weight
        self.last_terms: dict[str, torch.Tensor] = {}
        self.progress = 0.0

    @property
    def progress(self) -> float:
        """The fraction of the run's iterations completed, forwarded to the segmentation loss's KL annealing."""
        return self._progress

    @progress.setter
    def progress(self, value: float) -> None:
        self._progress = value
        if hasattr(self.seg_loss, "progress"):
            self.seg_loss.progress = value

    def terms(self, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unweighted terms ``{"seg", "quant", "edge"}`` (those with a non-zero weight).

        Args:
            outputs: the train-mode dict of :class:`scripts.networks.MEAMTNet`.
            targets: the dict of :class:`MultiTaskPrepareBatch`.
        """
        label = targets["label"]
        terms = {}
        if self.seg_weight:
            terms["seg"] = self.seg_loss(outputs["alpha"], label)
        if self.quant_weight:
            spacing = targets["spacing"].to(outputs["quant"])
            scale = field_of_view_scale(spacing, outputs["alpha"].shape[2:])
            target = targets["quant"].to(scale) / scale
            terms["quant"] = self.quant_loss(outputs["quant"], target, targets["quant_mask"])
        if self.edge_weight:
            boundary = boundary_map(label)
            pool = F.adaptive_max_pool2d if boundary.ndim == 4 else F.adaptive_max_pool3d
            bce = [
                F.binary_cross_entropy_with_logits(edge, pool(boundary, edge.shape[2:])) for edge in outputs["edges"]
            ]
            terms["edge"] = torch.stack(bce).mean()
        return terms

    def weights(self) -> dict[str, float]:
        """The current weight of every term of :meth:`terms`."""
        return {"seg": self.seg_weight, "quant": self.quant_weight, "edge": self.edge_weight}

    def forward(self, outputs: Mapping[str, Any], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of :meth:`terms` (a scalar); the unweighted terms are kept in :attr:`last_terms`."""
        terms = self.terms(outputs, targets)
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        weights = self.weights()
        return sum(weights[name] * value for name, value in terms.items())


class RunProgressHandler:
    """Gives a loss the run's progress before every iteration: ``loss.progress = (iteration - 1) / total``.

    ``total = max_epochs * epoch_length`` is the run's number of iterations, so every schedule of the losses (the
    KL annealing of Sensoy et al., the consistency ramps of :class:`SemiSupervisedLoss`) is a fraction of the run,
    whatever the epoch length (label ratio, ``epoch_length``, overlays) or the number of epochs.

    Args:
        loss: a module with a ``progress`` attribute (:class:`MultiTaskLoss`,
            :class:`scripts.evidential.DirichletLoss`).
    """

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        total = max(engine.state.max_epochs * (engine.state.epoch_length or 1), 1)
        self.loss.progress = (engine.state.iteration - 1) / total


class AllReduceGradientsHandler:
    """Keeps parameters outside the DDP network identical across the processes of a distributed run.

    :class:`SemiSupervisedLoss` owns trainable heads (feature projections, contrastive projection heads) that
    ``DistributedDataParallel`` does not see. This handler broadcasts their values from rank 0 when the run starts
    (``Events.STARTED``; each rank may have initialised them with its own seed) and all-reduces (averages) their
    gradients after every backward pass (``IterationEvents.BACKWARD_COMPLETED``, before the optimiser step); a
    missing gradient counts as zero. It does nothing without an initialised process group of more than one process.

    Args:
        module: the module whose parameters to synchronise (e.g. the loss).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.broadcast)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    @staticmethod
    def _world_size() -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def broadcast(self, engine: Engine) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        if self._world_size() < 2:
            return
        with torch.no_grad():
            for tensor in [*self.module.parameters(), *self.module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def __call__(self, engine: Engine) -> None:
        world = self._world_size()
        if world < 2:
            return
        for param in self.module.parameters():
            if not param.requires_grad:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad /= world


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class SemiSupervisedPrepareBatch(MultiTaskPrepareBatch):
    """Labelled batch + unlabelled batch -> ``(student input, targets)`` for :class:`SemiSupervisedLoss`.

    The student's input is ``cat([labelled image, unlabelled strong view])`` (``n_l + n_u`` slices), returned with
    the inferer keyword ``num_labelled=n_l`` (see :class:`LabelledUnlabelledInferer`). Besides the targets of
    :class:`MultiTaskPrepareBatch` (for the first ``n_l`` rows; ``"organs"`` too when present), ``targets`` holds:

    * ``"num_labelled"``: ``n_l``;
    * ``"teacher"``: the frozen teacher's ``forward_all`` outputs on the contrast-enhanced phases ``ce_key`` of the
      rows listed in ``"teacher_rows"`` (labelled and unlabelled rows whose records have CE images), if a teacher
      is given;
    * ``"ema"``: the EMA student's concentrations on the weak view (``image_key`` of the unlabelled batch), for the
      rows ``n_l:``, if an EMA network is given.

    Records without CE images are skipped by the teacher (a note is logged once per stream); a labelled or
    unlabelled stream must be homogeneous (all records with ``image_ce``, or none), as batches are collated.

    Args:
        unlabeled: the :class:`scripts.mean_teacher.UnlabeledStream` (or ``None``: labelled data only).
        teacher: the frozen CE teacher (:class:`scripts.distillation.FrozenTeacher`), or ``None``; a teacher whose
            ``enabled`` attribute is ``False`` counts as none.
        ema: the EMA student (:func:`scripts.mean_teacher.ema_network`), or ``None``.
        image_key: the student's input key (weak view for unlabelled batches).
        strong_key: the strongly augmented view of unlabelled batches.
        ce_key: the contrast-enhanced phases.
        target_keys: keys of the labelled batch copied into ``targets``.
    """

    def __init__(
        self,
        unlabeled: UnlabeledStream | None = None,
        teacher: nn.Module | None = None,
        ema: nn.Module | None = None,
        image_key: str = "image",
        strong_key: str = "strong",
        ce_key: str = "ce",
        target_keys: Sequence[str] = ("label", "quant", "quant_mask", "organs"),
    ) -> None:
        super().__init__(image_key=image_key, target_keys=target_keys)
        self.unlabeled = unlabeled if unlabeled else None
        self.teacher = teacher if teacher is not None and getattr(teacher, "enabled", True) else None
        self.ema = ema
        self.strong_key = strong_key
        self.ce_key = ce_key
        self._noted: set[str] = set()

    def _note(self, stream: str) -> None:
        if stream not in self._noted:
            self._noted.add(stream)
            logger.warning(
                f"{stream} records have no '{self.ce_key}' (contrast-enhanced images): the teacher's distillation "
                f"terms are skipped for them."
            )

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, Any], tuple, dict[str, int]]:
        image, targets = super().__call__(batchdata, device, non_blocking, **kwargs)
        num_labelled = image.shape[0]
        inputs, ce, rows = [_plain(image)], [], []
        if self.teacher is not None:
            if self.ce_key in batchdata:
                ce.append(batchdata[self.ce_key])
                rows.append(torch.arange(num_labelled))
            else:
                self._note("labelled")
        unlabeled = self.unlabeled.next() if self.unlabeled is not None else None
        if unlabeled is not None:
            strong = _plain(unlabeled[self.strong_key]).to(device=device, non_blocking=non_blocking)
            inputs.append(strong)
            if self.ema is not None:
                weak = _plain(unlabeled[self.image_key]).to(device=device, non_blocking=non_blocking)
                with torch.no_grad():
                    targets["ema"] = self.ema(weak)
            if self.teacher is not None:
                if self.ce_key in unlabeled:
                    ce.append(unlabeled[self.ce_key])
                    rows.append(torch.arange(num_labelled, num_labelled + strong.shape[0]))
                else:
                    self._note("unlabelled")
        if ce:
            x = torch.cat([_plain(c) for c in ce]).to(device=device, non_blocking=non_blocking)
            with torch.no_grad():
                targets["teacher"] = self.teacher.forward_all(x)  # type: ignore[union-attr]
            targets["teacher_rows"] = torch.cat(rows).to(device=device)
        targets["num_labelled"] = num_labelled
        return torch.cat(inputs), targets, (), {"num_labelled": num_labelled}


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


class LabelledUnlabelledInferer(Inferer):
    """Training inferer of :class:`SemiSupervisedPrepareBatch`'s input: the labelled rows ``[:num_labelled]`` and
    the unlabelled strong views ``[num_labelled:]`` in two forward passes, outputs concatenated along the batch.

    In a single pass the strongly augmented slices would share the batch-norm statistics of the clean labelled
    ones and enter the running statistics used at inference, which on the liver phantoms costs most of the test
    Dice (the ``one_pass_batch_norm`` ablation of the repository's ``scripts/benchmark_accuracy.py``). Here the
    labelled pass normalises and updates the running statistics as in supervised training, and the unlabelled pass
    normalises with its own batch statistics under :func:`frozen_norm_statistics`.

    Args:
        separate_passes: ``False`` runs all rows in one pass with shared batch statistics (the ablation
            ``one_pass_batch_norm`` of ``scripts/benchmark_accuracy.py``).
    """

    def __init__(self, separate_passes: bool = True) -> None:
        super().__init__()
        self.separate_passes = separate_passes

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: nn.Module, *args: Any, num_labelled: int | None = None, **kwargs: Any
    ) -> Any:
        """
        Args:
            inputs: ``[n_l + n_u, C, H, W]``, labelled rows first.
            network: the student (``forward_all`` dict in train mode).
            num_labelled: ``n_l``; ``None`` or ``n_l == len(inputs)`` runs one pass.

        Returns:
            the network's outputs for all ``n_l + n_u`` rows, in input order.
        """
        if not self.separate_passes or num_labelled is None or num_labelled >= inputs.shape[0]:
            return network(inputs, *args, **kwargs)
        labelled = network(inputs[:num_labelled], *args, **kwargs)
        with frozen_norm_statistics(network):
            unlabelled = network(inputs[num_labelled:], *args, **kwargs)
        return _concat_rows(labelled, unlabelled)


def _concat_rows(first: Any, second: Any) -> Any:
    """Batch-wise concatenation of two network outputs (tensors, or dicts/lists of tensors of equal structure)."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, Mapping):
        return {k: _concat_rows(v, second[k]) for k, v in first.items()}
    return [_concat_rows(a, b) for a, b in zip(first, second)]


def _select_rows(outputs: Mapping[str, Any], rows: slice | torch.Tensor) -> dict[str, Any]:
    """The batch rows ``rows`` of every tensor (and list of tensors) of a ``forward_all`` dict."""
    return {
        k: [t[rows] for t in v] if isinstance(v, (list, tuple)) else v[rows]
        for k, v in outputs.items()
        if isinstance(v, (list, tuple, torch.Tensor))
    }


class SemiSupervisedLoss(MultiTaskLoss):
    """CdUgJL training loss: supervised terms on labelled slices, distillation from the CE teacher, consistency.

    With the targets of :class:`SemiSupervisedPrepareBatch` (student rows ``[:n_l]`` labelled, ``[n_l:]``
    unlabelled strong views) the terms are

    * ``seg``, ``quant``, ``edge`` (labelled rows): :class:`MultiTaskLoss`;
    * ``attention``, ``feature`` (teacher rows): :class:`scripts.distillation.FeatureDistillationLoss`;
    * ``distill_kl`` (teacher rows): :class:`scripts.distillation.DirichletKLLoss`, ``KL(teacher || student)``;
    * ``contrast`` (teacher rows): :class:`scripts.distillation.RegionContrastiveLoss`, computed separately for
      labelled rows (regions from the label, and the liver from ``"organs"`` when present:
      :func:`scripts.distillation.region_map`) and unlabelled rows (regions from the teacher's confident
      prediction, tumour vs. non-tumour: :func:`scripts.distillation.teacher_region_map`), then averaged;
    * ``consistency`` (unlabelled rows): :class:`scripts.consistency.UncertaintyConsistencyLoss` against the EMA
      on the weak view, masked to the ``kept_fraction(progress, consistency_rampup, kept_fraction_start)`` least
      uncertain voxels of each class the EMA predicts, and weighted by
      ``consistency_weight * sigmoid_rampup(progress, consistency_rampup)``.

    A weight of 0 removes its term (nothing is computed for it). Terms whose inputs are absent from a batch (no
    teacher, no unlabelled data) are left out of that batch.

    Args:
        seg_loss, quant_loss, seg_weight, quant_weight, edge_weight: as :class:`MultiTaskLoss`.
        distillation: the feature distillation module (needed if ``attention_weight`` or ``feature_weight``).
        contrast: the region contrastive module (needed if ``contrast_weight``).
        consistency: the consistency module (default: masked, :class:`UncertaintyConsistencyLoss`).
        attention_weight: weight of the attention alignment.
        feature_weight: weight of the projected-feature matching.
        contrast_weight: weight of the region InfoNCE.
        distill_kl_weight: weight of the teacher-student Dirichlet KL.
        consistency_weight: final weight of the consistency term.
        consistency_rampup: length of the consistency weight and kept-fraction ramps, as a fraction of the run.
        kept_fraction_start: the fraction of voxels the consistency mask keeps at the start of the ramp (as UA-MT's
            0.75 of the maximum entropy).
        region_max_uncertainty: teacher uncertainty below which unlabelled voxels get a region.
    """

    def __init__(
        self,
        seg_loss: nn.Module | None = None,
        quant_loss: nn.Module | None = None,
        seg_weight: float = 1.0,
        quant_weight: float = 0.1,
        edge_weight: float = 0.0,
        distillation: FeatureDistillationLoss | None = None,
        contrast: RegionContrastiveLoss | None = None,
        consistency: nn.Module | None = None,
        attention_weight: float = 0.0,
        feature_weight: float = 0.0,
        contrast_weight: float = 0.0,
        distill_kl_weight: float = 0.0,
        consistency_weight: float = 0.0,
        consistency_rampup: float = 0.0,
        kept_fraction_start: float = 0.75,
        region_max_uncertainty: float = 0.5,
    ) -> None:
        super().__init__(seg_loss, quant_loss, seg_weight, quant_weight, edge_weight)
        if (attention_weight or feature_weight) and distillation is None:
            raise ValueError("attention_weight / feature_weight need a `distillation` module.")
        if contrast_weight and contrast is None:
            raise ValueError("contrast_weight needs a `contrast` module.")
        self.distillation = distillation
        self.contrast = contrast
        self.consistency = consistency if consistency is not None else UncertaintyConsistencyLoss()
        self.kl = DirichletKLLoss()
        self.attention_weight = attention_weight
        self.feature_weight = feature_weight
        self.contrast_weight = contrast_weight
        self.distill_kl_weight = distill_kl_weight
        self.consistency_weight = consistency_weight
        self.consistency_rampup = consistency_rampup
        self.kept_fraction_start = kept_fraction_start
        self.region_max_uncertainty = region_max_uncertainty

    @property
    def mask_fraction(self) -> float:
        """The current fraction of voxels the consistency mask keeps."""
        return kept_fraction(self.progress, self.consistency_rampup, self.kept_fraction_start)

    def weights(self) -> dict[str, float]:
        ramp = sigmoid_rampup(self.progress, self.consistency_rampup)
        return {
            **super().weights(),
            "attention": self.attention_weight,
            "feature": self.feature_weight,
            "contrast": self.contrast_weight,
            "distill_kl": self.distill_kl_weight,
            "consistency": self.consistency_weight * ramp,
        }

    def _contrast(self, student: Mapping[str, Any], teacher: Mapping[str, Any], rows: torch.Tensor, targets):
        """Mean of the region contrast over the labelled and the unlabelled teacher rows."""
        num_labelled = targets["num_labelled"]
        groups = []
        labelled = rows < num_labelled
        if labelled.any():
            organs = targets.get("organs")
            regions = region_map(targets["label"][rows[labelled]], None if organs is None else organs[rows[labelled]])
            groups.append((labelled, regions))
        if (~labelled).any():
            regions = teacher_region_map(teacher["alpha"][~labelled], self.region_max_uncertainty)
            groups.append((~labelled, regions))
        values = [
            self.contrast(  # type: ignore[misc]
                [f[which] for f in student["features"]], [f[which] for f in teacher["features"]], regions
            )
            for which, regions in groups
        ]
        return torch.stack(values).mean()

    def terms(self, outputs: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The unweighted terms with a non-zero weight whose inputs are in the batch (see the class docstring)."""
        num_labelled = targets.get("num_labelled", outputs["alpha"].shape[0])
        terms = super().terms(_select_rows(outputs, slice(0, num_labelled)), targets)
        teacher = targets.get("teacher")
        if teacher is not None:
            rows = targets["teacher_rows"]
            student = _select_rows(outputs, rows)
            if self.attention_weight or self.feature_weight:
                attention, feature = self.distillation(student["features"], teacher["features"])  # type: ignore
                if self.attention_weight:
                    terms["attention"] = attention
                if self.feature_weight:
                    terms["feature"] = feature
            if self.distill_kl_weight:
                terms["distill_kl"] = self.kl(student["alpha"], teacher["alpha"])
            if self.contrast_weight:
                terms["contrast"] = self._contrast(student, teacher, rows, targets)
        ema = targets.get("ema")
        if ema is not None and self.consistency_weight:
            terms["consistency"] = self.consistency(outputs["alpha"][num_labelled:], ema, self.mask_fraction)
        return terms
