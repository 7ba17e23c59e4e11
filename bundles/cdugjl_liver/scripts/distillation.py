"""Teacher-to-student distillation losses: contrast-enhanced (CE) teacher -> non-contrast student.

The teacher is a MEAMT-Net trained on the CE phases (``configs/train.json`` + ``configs/train_teacher.json``),
frozen; the student sees T2WI + DWI of the same slice (same spatial transforms), so teacher and student maps
correspond voxel by voxel. Three kinds of terms, each with its own weight in ``configs/train.json``:

* :class:`FeatureDistillationLoss`: at several encoder stages, (a) attention alignment: the normalised spatial
  attention maps ``A(F) = mean_c F_c^2`` (Zagoruyko & Komodakis, ICLR 2017) of teacher and student are matched, and
  (b) projected features: a trainable 1x1 convolution (:class:`FeatureProjections`) maps the student features to the
  teacher's, and the channel-normalised maps are matched per position;
* :class:`RegionContrastiveLoss`: embeddings pooled over regions (background, liver, tumour) of the student's
  features (through a trainable head, :class:`RegionHead`) and the teacher's, with an InfoNCE loss whose positives
  are the same region across the two networks and whose negatives are different regions (:func:`region_info_nce`);
* :class:`DirichletKLLoss`: ``KL(Dir(alpha_teacher) || Dir(alpha_student))`` per voxel (:func:`dirichlet_kl`).

The trainable student sides of (a) and (b), :class:`FeatureProjections` and :class:`RegionHead`, are trained with
the student and run inside its forward pass (:class:`scripts.student.DistillationStudent`), so that the losses
here hold no parameters. :class:`FrozenTeacher` (:func:`load_teacher`) holds the frozen teacher;
:func:`region_map` and :func:`teacher_region_map` give the region masks for labelled and unlabelled slices.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .consistency import uncertainty_mask

__all__ = [
    "DirichletKLLoss",
    "FeatureDistillationLoss",
    "FeatureProjections",
    "FrozenTeacher",
    "RegionContrastiveLoss",
    "RegionHead",
    "attention_map",
    "dirichlet_kl",
    "load_teacher",
    "recorded_dice",
    "region_embeddings",
    "region_info_nce",
    "region_map",
    "teacher_region_map",
]

BACKGROUND, LIVER, TUMOUR = 0, 1, 2
"""Region ids of :func:`region_map`; ``IGNORE`` (-1) marks voxels that belong to no region."""
IGNORE = -1

logger = logging.getLogger(__name__)


def load_teacher(
    network: nn.Module, ckpt_path: str | os.PathLike, device: str | torch.device | None = None
) -> nn.Module:
    """Load the contrast-enhanced teacher's weights and freeze it (``eval()``, no gradients).

    Args:
        network: the teacher architecture (a MEAMT-Net with 3 input channels).
        ckpt_path: its weights: a plain state dict (``models/teacher/model.pt`` written by the teacher run)
            or a training checkpoint holding one under ``"model"`` (``models/teacher/checkpoint.pt``).
        device: where to put it (a string such as ``"cpu"`` works).

    Returns:
        the frozen ``network``.

    Raises:
        FileNotFoundError: ``ckpt_path`` does not exist (the message says how to make it).
    """
    ckpt_path = os.fspath(ckpt_path)
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(
            f"teacher checkpoint not found: {ckpt_path}. The distillation terms (attention_weight, feature_weight, "
            "contrast_weight, distill_kl_weight) need the contrast-enhanced teacher: train it first with "
            "configs/train.json + configs/train_teacher.json (same --ckpt_dir), point --teacher_ckpt to it, or set "
            "those weights to 0."
        )
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    network.load_state_dict(state)
    network.eval().requires_grad_(False)
    logger.info(f"loaded the frozen teacher from {ckpt_path}.")
    return network.to(device) if device is not None else network


def recorded_dice(model_dir: str | os.PathLike, metric: str = "val_mean_dice") -> float | None:
    """The last validation Dice a training run recorded in ``<model_dir>/metrics.csv`` (MONAI ``MetricsSaver`` of
    ``configs/train.json``: one ``name,value`` line per metric), or ``None`` when there is none."""
    path = Path(model_dir) / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        values = {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2}
    return float(values[metric]) if metric in values else None


class FrozenTeacher(nn.Module):
    """The frozen CE teacher, loaded from its checkpoint when it is first used.

    Loading lazily lets a training config be instantiated without the checkpoint (``check_properties``, exporting,
    MONAI Label reading the config); a training run that needs the teacher fails at its first iteration with the
    :func:`load_teacher` error. :meth:`train` never leaves ``eval()`` mode.

    With ``min_dice`` (the validation Dice of a supervised T2WI + DWI student of the same labels), loading checks
    the teacher's own last validation Dice (:func:`recorded_dice` of its checkpoint folder): distilling from a
    teacher that segments worse than supervised training alone teaches the student its errors. A worse teacher, or
    one without a recorded Dice, is refused (``RuntimeError``) or, with ``on_worse="warn"``, logged as an error and
    used.

    Args:
        network: the teacher architecture.
        ckpt_path: the teacher's weights (see :func:`load_teacher`).
        device: where to put it.
        enabled: ``False`` when no distillation term is active or no training record has contrast-enhanced
            images; the trainer then ignores the teacher (see :class:`scripts.trainer.CdUgJLTrainer`).
        min_dice: the validation Dice the teacher must reach, or ``None`` (no check).
        on_worse: ``"refuse"`` or ``"warn"``.
    """

    def __init__(
        self,
        network: nn.Module,
        ckpt_path: str | os.PathLike,
        device: str | torch.device | None = None,
        enabled: bool = True,
        min_dice: float | None = None,
        on_worse: str = "refuse",
    ) -> None:
        super().__init__()
        if on_worse not in ("refuse", "warn"):
            raise ValueError(f"on_worse must be 'refuse' or 'warn', got {on_worse!r}")
        self.network = network
        self.ckpt_path = ckpt_path
        self.device = device
        self.enabled = enabled
        self.min_dice = min_dice
        self.on_worse = on_worse
        self.loaded = False
        if not enabled:
            logger.info("no teacher: every distillation weight is 0 or no training record has 'ce'.")

    def check(self) -> None:
        """Compare the teacher's recorded validation Dice with ``min_dice`` (see the class docstring)."""
        if self.min_dice is None:
            return
        dice = recorded_dice(Path(os.fspath(self.ckpt_path)).parent)
        if dice is not None and dice >= self.min_dice:
            logger.info(f"teacher validation Dice {dice:.3f} >= {self.min_dice:.3f} (teacher_min_dice).")
            return
        found = "no recorded validation Dice (metrics.csv beside it)" if dice is None else f"validation Dice {dice:.3f}"
        message = (f"the contrast-enhanced teacher {self.ckpt_path} has {found}, below teacher_min_dice "
                   f"{self.min_dice:.3f} (a supervised student's): distilling from it would teach the student its "
                   "errors. Train the teacher longer or on more labels, set the distillation weights to 0, or pass "
                   "--teacher_check warn to use it anyway.")
        if self.on_worse == "refuse":
            raise RuntimeError(message)
        logger.error("USING A TEACHER WORSE THAN SUPERVISED TRAINING: " + message)

    def load(self) -> FrozenTeacher:
        """Check and load the weights (once)."""
        if not self.loaded:
            self.check()
            load_teacher(self.network, self.ckpt_path, self.device)
            self.loaded = True
        return self

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stay in ``eval()`` mode (batch-norm running statistics, as trained)."""
        return super().train(False)

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """The teacher's ``forward_all`` outputs (loading it first if needed)."""
        return self.load().network.forward_all(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        return self.forward_all(x)


def attention_map(features: torch.Tensor, power: int = 2) -> torch.Tensor:
    """Normalised spatial attention map of a feature map (attention transfer, Zagoruyko & Komodakis 2017).

    Args:
        features: ``[B, C, *spatial]``.
        power: exponent ``p`` of ``mean_c |F_c|^p``.

    Returns:
        ``[B, N]`` (``N`` = number of positions), L2-normalised per sample.
    """
    return F.normalize(features.abs().pow(power).mean(1).flatten(1), dim=1)


def _identity_conv(in_channels: int, out_channels: int, spatial_dims: int) -> nn.Module:
    """A 1x1 convolution, initialised to the identity when the widths match (then it starts as plain matching)."""
    conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(in_channels, out_channels, kernel_size=1)
    if in_channels == out_channels:
        nn.init.dirac_(conv.weight)
        nn.init.zeros_(conv.bias)
    return conv


class FeatureProjections(nn.Module):
    """The student side of the projected-feature matching: a trainable 1x1 convolution per encoder stage, from the
    student's width to the teacher's, identity-initialised when the widths match (then the matching starts plain).

    Args:
        student_channels: widths of the student's feature maps (``forward_all(x)["features"]``), indexed by stage.
        teacher_channels: widths of the teacher's (default: the student's).
        stages: indices into the ``features`` lists (MEAMT-Net: 0 stem, 1-3 encoder stages H/2-H/8, 4 bottleneck
            H/16).
        spatial_dims: 2 or 3.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int] | None = None,
        stages: Sequence[int] = (1, 2, 3, 4),
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.stages = tuple(stages)
        teacher_channels = student_channels if teacher_channels is None else teacher_channels
        self.projections = nn.ModuleList(
            [_identity_conv(student_channels[i], teacher_channels[i], spatial_dims) for i in self.stages]
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """
        Args:
            features: the student's feature maps, ``[B, C_i, *spatial_i]`` for every stage of the network.

        Returns:
            the projected maps of ``stages``, in their order, ``[B, C^teacher_i, *spatial_i]``.
        """
        return [projection(features[stage]) for stage, projection in zip(self.stages, self.projections)]


class FeatureDistillationLoss(nn.Module):
    """Attention alignment and projected-feature matching at several encoder stages.

    For every stage ``i`` (student features ``S_i``, teacher features ``T_i`` of the same spatial size, the
    student's projected features ``P_i S_i`` from :class:`FeatureProjections`):

    * ``attention`` = ``mean_i mean_b ||A(S_i) - A(T_i)||^2`` with :func:`attention_map` (in ``[0, 4]``);
    * ``feature`` = ``mean_i mean_{b, positions} ||n(P_i S_i) - n(T_i)||^2 / 2``, where ``n`` L2-normalises along
      channels (zero vectors stay zero), i.e. one minus the cosine similarity of the feature vectors at each
      position.

    Both are zero for identical teacher and student features (with identity projections).

    Args:
        stages: indices into the networks' ``features`` lists, those of the :class:`FeatureProjections`.
        power: exponent of :func:`attention_map`.
    """

    def __init__(self, stages: Sequence[int] = (1, 2, 3, 4), power: int = 2) -> None:
        super().__init__()
        self.stages = tuple(stages)
        self.power = power

    def forward(
        self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], projected: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            student: the student's feature maps (``forward_all(x)["features"]``), ``[B, C_i, *spatial_i]``.
            teacher: the teacher's feature maps for the same slices.
            projected: the student's projected maps of ``stages`` (``"projected"`` of
                :class:`scripts.student.DistillationStudent`), in their order.

        Returns:
            ``(attention, feature)``, two scalars.
        """
        attention, feature = [], []
        for stage, p in zip(self.stages, projected):
            s, t = student[stage], teacher[stage].detach()
            attention.append((attention_map(s, self.power) - attention_map(t, self.power)).pow(2).sum(1).mean())
            diff = F.normalize(p, dim=1) - F.normalize(t, dim=1)
            feature.append(0.5 * diff.pow(2).sum(1).mean())
        return torch.stack(attention).mean(), torch.stack(feature).mean()


def dirichlet_kl(alpha_p: torch.Tensor, alpha_q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``KL(Dir(alpha_p) || Dir(alpha_q))`` along ``dim`` (closed form).

    ``lnG(S_p) - sum_k lnG(p_k) - lnG(S_q) + sum_k lnG(q_k) + sum_k (p_k - q_k)(psi(p_k) - psi(S_p))``.

    Args:
        alpha_p: concentrations of the reference distribution (> 0), classes along ``dim``.
        alpha_q: concentrations of the approximating distribution, same shape.
        dim: the class dimension.

    Returns:
        the divergence (>= 0) with ``dim`` kept as a singleton.
    """
    sp, sq = alpha_p.sum(dim, keepdim=True), alpha_q.sum(dim, keepdim=True)
    return (
        torch.lgamma(sp)
        - torch.lgamma(sq)
        + (torch.lgamma(alpha_q) - torch.lgamma(alpha_p)).sum(dim, keepdim=True)
        + ((alpha_p - alpha_q) * (torch.digamma(alpha_p) - torch.digamma(sp))).sum(dim, keepdim=True)
    )


class DirichletKLLoss(nn.Module):
    """Mean over voxels of ``KL(Dir(alpha_teacher) || Dir(alpha_student))`` (the teacher is the reference).

    Zero when the student's concentrations equal the teacher's; the teacher's are detached.
    """

    def forward(self, student_alpha: torch.Tensor, teacher_alpha: torch.Tensor) -> torch.Tensor:
        """``[B, K, *spatial]`` concentrations of both -> scalar."""
        return dirichlet_kl(teacher_alpha.detach().to(student_alpha), student_alpha).mean()


def region_map(label: torch.Tensor, organs: torch.Tensor | None = None, liver_label: int = 1) -> torch.Tensor:
    """Region ids of labelled slices: ``TUMOUR`` (2) where ``label > 0``, else ``LIVER`` (1) where
    ``organs == liver_label``, else ``BACKGROUND`` (0).

    Without an organ mask (MONAI Label records, real data without organ labels) there is no liver region: every
    non-tumour voxel is ``BACKGROUND``, i.e. the contrast is tumour vs. non-tumour.

    Args:
        label: ``[B, 1, *spatial]`` tumour label (0/1).
        organs: optional ``[B, 1, *spatial]`` organ labels.
        liver_label: the liver's value in ``organs``.

    Returns:
        ``[B, *spatial]`` long region ids.
    """
    regions = torch.full_like(label[:, 0], BACKGROUND, dtype=torch.long)
    if organs is not None:
        regions[organs[:, 0].round().long() == liver_label] = LIVER
    regions[label[:, 0] > 0.5] = TUMOUR
    return regions


def teacher_region_map(teacher_alpha: torch.Tensor, kept_fraction: float = 0.9) -> torch.Tensor:
    """Region ids of unlabelled slices from the teacher's confident prediction.

    The teacher segments tumour vs. background only, so the regions are ``TUMOUR`` (2, argmax tumour) and
    ``BACKGROUND`` (0, argmax background: every non-tumour tissue, liver included). Of each predicted class the
    ``kept_fraction`` of voxels with the lowest teacher uncertainty ``K / S`` keep their region, the rest are
    ``IGNORE`` (-1) (:func:`scripts.consistency.uncertainty_mask`, the rule of the consistency mask). A fixed
    threshold on ``K / S`` does not gate a calibrated teacher: on 12 unlabelled phantom volumes no voxel of a trained
    teacher reached ``K / S = 0.5`` (largest 0.49), not even among the 10 289 it got wrong, while the 10 % most
    uncertain of each predicted class held 32 % of its wrong tumour voxels and 61 % of its wrong background voxels
    (``scripts/teacher_regions.py``; ``docs/benchmarks.md``, *Teacher-region gating*).

    Args:
        teacher_alpha: ``[B, K, *spatial]`` teacher concentrations (class 0 background, classes >= 1 tumour).
        kept_fraction: in ``(0, 1]``, the fraction of each predicted class that keeps its region.

    Returns:
        ``[B, *spatial]`` long region ids.
    """
    regions = torch.where(teacher_alpha.argmax(1) > 0, TUMOUR, BACKGROUND)
    kept = uncertainty_mask(teacher_alpha, kept_fraction)[:, 0] > 0
    return torch.where(kept, regions, torch.full_like(regions, IGNORE))


def region_embeddings(
    features: torch.Tensor, regions: torch.Tensor, num_regions: int = 3, min_voxels: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the features over each region of each sample (masked average pooling).

    The one-hot region masks (full resolution) are area-averaged down to the feature resolution, so a region
    smaller than a feature cell contributes with its fractional weight.

    Args:
        features: ``[B, C, *spatial_f]``.
        regions: ``[B, *spatial]`` region ids in ``[0, num_regions)`` or ``IGNORE``; ``spatial`` a multiple of
            ``spatial_f``.
        num_regions: ``R``.
        min_voxels: a region is valid in a sample when it has at least this many full-resolution voxels.

    Returns:
        ``(embeddings [B, R, C], valid [B, R] bool)``; invalid entries are zero.
    """
    onehot = torch.stack([regions == r for r in range(num_regions)], 1).to(features.dtype)
    counts = onehot.flatten(2).sum(-1)
    pool = F.adaptive_avg_pool2d if features.ndim == 4 else F.adaptive_avg_pool3d
    weights = pool(onehot, features.shape[2:]).flatten(2)  # [B, R, N]
    sums = torch.einsum("brn,bcn->brc", weights, features.flatten(2))
    embeddings = sums / weights.sum(-1, keepdim=True).clamp_min(1e-8)
    return embeddings, counts >= min_voxels


def region_info_nce(
    anchors: torch.Tensor, keys: torch.Tensor, regions: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """InfoNCE between two sets of region embeddings: positives share the region id, negatives do not.

    With cosine similarities ``s_ij = <n(a_i), n(k_j)> / temperature``, for every anchor ``i`` and every key ``p``
    of the same region (``p = i``, its own counterpart, included):
    ``-log( exp(s_ip) / (exp(s_ip) + sum_{n: region_n != region_i} exp(s_in)) )``, averaged over ``p`` and then
    over the anchors that have at least one negative. Keys of the same region are never negatives.

    Args:
        anchors: ``[N, D]`` embeddings (e.g. the student's regions).
        keys: ``[N, D]`` embeddings of the same ``N`` (sample, region) pairs (e.g. the teacher's).
        regions: ``[N]`` region ids.
        temperature: the InfoNCE temperature.

    Returns:
        a scalar; zero (still attached to the graph) when no anchor has a negative.
    """
    logits = F.normalize(anchors, dim=1) @ F.normalize(keys, dim=1).t() / temperature
    same = regions[:, None] == regions[None, :]
    has_negative = (~same).any(1)
    if not has_negative.any():
        return anchors.sum() * 0.0
    negatives = torch.logsumexp(logits.masked_fill(same, float("-inf")), dim=1, keepdim=True)  # [N, 1]
    # -log(e^pos / (e^pos + e^neg)) = softplus(neg - pos)
    per_pair = F.softplus(negatives - logits)
    per_anchor = (per_pair * same).sum(1) / same.sum(1)
    return per_anchor[has_negative].mean()


class RegionHead(nn.Module):
    """The student side of the region contrast: the student's features at one stage pooled over the regions of every
    slice (:func:`region_embeddings`) and passed through a trainable projection head (a 2-layer MLP, as the authors'
    ``FeatureProjector``) into the teacher's feature space.

    Args:
        student_channels: width of the student's features at ``stage``.
        teacher_channels: width of the teacher's (default: the student's); the head's output width.
        stage: index into the ``features`` lists (MEAMT-Net: 2 = H/4).
        embed_dim: hidden width of the head (0: no head, which needs equal widths).
        num_regions: number of region ids (3: background, liver, tumour).
        min_voxels: least full-resolution voxels of a valid region.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int | None = None,
        stage: int = 2,
        embed_dim: int = 128,
        num_regions: int = 3,
        min_voxels: float = 1.0,
    ) -> None:
        super().__init__()
        teacher_channels = student_channels if teacher_channels is None else teacher_channels
        if embed_dim <= 0:
            if teacher_channels != student_channels:
                raise ValueError(f"embed_dim 0 (no head) needs equal widths, got {student_channels} (student) and "
                                 f"{teacher_channels} (teacher).")
            self.head: nn.Module = nn.Identity()
        else:
            self.head = nn.Sequential(nn.Linear(student_channels, embed_dim), nn.ReLU(inplace=True),
                                      nn.Linear(embed_dim, teacher_channels))
        self.out_channels = teacher_channels
        self.stage = stage
        self.num_regions = num_regions
        self.min_voxels = min_voxels

    def forward(
        self, features: Sequence[torch.Tensor] | torch.Tensor, regions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            features: the student's feature list (``features`` of ``forward_all``) or the map at ``stage``.
            regions: ``[B, *spatial]`` region ids (:func:`region_map`, :func:`teacher_region_map`).

        Returns:
            ``(embeddings [B, R, C^teacher], valid [B, R] bool)``: the projected region embeddings, zero where a
            region is not valid (fewer than ``min_voxels`` voxels).
        """
        s = features if isinstance(features, torch.Tensor) else features[self.stage]
        pooled, valid = region_embeddings(s, regions, self.num_regions, self.min_voxels)
        projected = self.head(pooled[valid])
        embeddings = pooled.new_zeros(*valid.shape, self.out_channels).index_put((valid,), projected)
        return embeddings, valid


class RegionContrastiveLoss(nn.Module):
    """Region-level contrast between student and teacher features (symmetric InfoNCE of :func:`region_info_nce`).

    The student's projected region embeddings come from :class:`RegionHead`; the teacher's features of the same
    stage are pooled over the teacher's regions (:func:`region_embeddings`) and are the keys as they are (detached,
    no head). The anchors are the student's (sample, region) embeddings valid on both sides, the keys the
    teacher's, and the loss is the mean of the student->teacher and teacher->student terms.

    Keys without a trainable head are what keeps the term informative: a head shared by both sides (this bundle
    before 0.6.0) could separate the regions of both networks by itself, and the term fell from 1.6 to 1e-4 within
    150 iterations (as measured for issue 16), after which it carried nothing to the student. With fixed keys the
    loss is bounded below by how far apart the teacher's own region embeddings are, and it is minimal only where the
    student's projected regions point as the teacher's do.

    Args:
        stage: index into the teacher's ``features`` list, the :class:`RegionHead`'s stage.
        temperature: InfoNCE temperature (authors: 0.07).
        num_regions: number of region ids, the :class:`RegionHead`'s.
        min_voxels: least full-resolution voxels of a valid region, the :class:`RegionHead`'s.
    """

    def __init__(
        self, stage: int = 2, temperature: float = 0.07, num_regions: int = 3, min_voxels: float = 1.0
    ) -> None:
        super().__init__()
        self.stage = stage
        self.temperature = temperature
        self.num_regions = num_regions
        self.min_voxels = min_voxels

    def forward(
        self,
        student: torch.Tensor,
        student_valid: torch.Tensor,
        teacher: Sequence[torch.Tensor] | torch.Tensor,
        teacher_regions: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            student: ``[B, R, C]`` the student's projected region embeddings (:class:`RegionHead`).
            student_valid: ``[B, R]`` which of them are valid.
            teacher: the teacher's feature list, or its map at ``stage``, for the same slices.
            teacher_regions: ``[B, *spatial]`` region ids for the teacher's pooling: those the student was pooled
                over; a different map is what a wrong region assignment looks like (the loss rises).

        Returns:
            a scalar.
        """
        t = teacher if isinstance(teacher, torch.Tensor) else teacher[self.stage]
        t_emb, t_valid = region_embeddings(t.detach(), teacher_regions, self.num_regions, self.min_voxels)
        valid = student_valid & t_valid
        ids = torch.arange(self.num_regions, device=student.device).expand_as(valid)[valid]
        if ids.numel() < 2:
            return student.sum() * 0.0
        s_z, t_z = student[valid], t_emb[valid].to(student)
        return 0.5 * (
            region_info_nce(s_z, t_z, ids, self.temperature) + region_info_nce(t_z, s_z, ids, self.temperature)
        )
