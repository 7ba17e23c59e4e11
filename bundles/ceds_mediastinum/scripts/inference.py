"""Inference with the confidence map: a ``SupervisedEvaluator`` that also stores the network's P(correct)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from .mean_teacher import unwrap

__all__ = ["ConfidenceEvaluator", "SegmentationWithConfidence"]


class SegmentationWithConfidence(nn.Module):
    """Wraps a :class:`scripts.networks.CEDSNet` to return ``(seg_logits, p_correct)`` in any mode.

    Args:
        network: the CEDS network (optionally wrapped in ``DataParallel``/``DistributedDataParallel``).

    Returns (of ``forward``):
        segmentation logits ``[B, out_channels, *spatial]`` and the confidence head's probability that the
        segmentation is correct, ``[B, 1, *spatial]`` in [0, 1].
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = unwrap(network)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg, confidence = self.network.forward_with_confidence(x)
        return seg, torch.softmax(confidence, dim=1)[:, 1:2]


class ConfidenceEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` whose iteration stores the segmentation logits under ``pred`` and the confidence map
    (P(correct), one channel) under ``confidence_key``, both from one inferer call (e.g. sliding window).

    Args:
        args: positional arguments of ``monai.engines.SupervisedEvaluator``.
        confidence_key: key of the confidence map in ``engine.state.output``.
        kwargs: keyword arguments of ``monai.engines.SupervisedEvaluator``.
    """

    def __init__(self, *args: Any, confidence_key: str = "confidence", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.confidence_key = confidence_key

    def _iteration(self, engine: SupervisedEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:
        """Run the inferer on :class:`SegmentationWithConfidence` (under CUDA autocast with ``amp``); returns
        ``image``, ``label``, ``pred`` and the confidence map."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        autocast = torch.autocast("cuda", **engine.amp_kwargs) if engine.amp else contextlib.nullcontext()
        with engine.mode(engine.network), autocast:
            seg, confidence = engine.inferer(inputs, SegmentationWithConfidence(engine.network))
        engine.state.output[Keys.PRED] = seg
        engine.state.output[self.confidence_key] = confidence
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
