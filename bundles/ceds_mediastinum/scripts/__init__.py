"""Code of the ``ceds_mediastinum`` bundle: network, losses, training engine, inference and metric helpers."""

from . import data, inference, losses, metrics, networks, trainer

__all__ = ["data", "inference", "losses", "metrics", "networks", "trainer"]
