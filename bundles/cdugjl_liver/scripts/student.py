"""The CdUgJL student as it is trained: the segmentation network with the trainable student sides of its
distillation terms.

The feature projections (:class:`scripts.distillation.FeatureProjections`) and the region head
(:class:`scripts.distillation.RegionHead`) are trained with the student but are not part of the model that is
served. :class:`DistillationStudent` holds them with the network, so that one module carries every trainable
parameter and every trainable operation runs in its ``forward``: the optimiser takes its parameters and, under
``configs/multi_gpu_train.json``, DDP wraps it as it wraps CEDS's network with its confidence branch (``student``
in both bundles). ``models/model.pt`` holds the ``network`` alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .distillation import FeatureProjections, RegionHead

__all__ = ["DistillationStudent"]


class DistillationStudent(nn.Module):
    """The student network and the trainable heads of its distillation terms.

    In train mode ``forward(x, project, regions)`` returns the network's ``forward_all`` dict (``"alpha"``,
    ``"features"``, ...) and, when asked for,

    * ``"projected"``: the projected feature maps of the feature matching (``project=True``), a list
      ``[B, C^teacher_i, *spatial_i]`` over the projections' stages;
    * ``"region_embeddings"`` ``[B, R, C^teacher]`` and ``"region_valid"`` ``[B, R]``: the student's projected
      region embeddings over ``regions`` ``[B, *spatial]`` for the region contrast.

    In eval mode it is the network (``forward(x)`` returns its single output), so that evaluators may run it.

    Args:
        network: the student (``network`` of ``configs/train.json``, a MEAMT-Net).
        projections: the feature projections, or ``None`` (the teacher run of ``configs/train_teacher.json``).
        region_head: the region contrast's projection head, or ``None``.
    """

    def __init__(
        self, network: nn.Module, projections: FeatureProjections | None = None, region_head: RegionHead | None = None
    ) -> None:
        super().__init__()
        self.network = network
        heads = {"projections": projections, "region": region_head}
        self.heads = nn.ModuleDict({name: head for name, head in heads.items() if head is not None})

    def forward(
        self, x: torch.Tensor, project: bool = False, regions: torch.Tensor | None = None
    ) -> Any:
        """
        Args:
            x: ``[B, C_in, *spatial]`` input slices.
            project: also return the projected features (train mode).
            regions: ``[B, *spatial]`` region ids: also return the projected region embeddings (train mode).

        Raises:
            ValueError: a head is asked for that this student does not have.
        """
        if not self.training:
            return self.network(x)
        missing = [name for name, asked in (("projections", project), ("region", regions is not None))
                   if asked and name not in self.heads]
        if missing:
            raise ValueError(f"this student has no {' or '.join(missing)} head, which a distillation term asks for.")
        outputs = dict(self.network(x))
        if project:
            outputs["projected"] = self.heads["projections"](outputs["features"])
        if regions is not None:
            outputs["region_embeddings"], outputs["region_valid"] = self.heads["region"](outputs["features"], regions)
        return outputs
