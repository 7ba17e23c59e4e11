"""Handlers of the liver bundle's training runs."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

__all__ = ["AllReduceGradientsHandler"]


class AllReduceGradientsHandler:
    """Keeps parameters outside the DDP network identical across the processes of a distributed run.

    :class:`scripts.losses.CdUgJLLoss` owns trainable heads (feature projections, contrastive projection heads) that
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
