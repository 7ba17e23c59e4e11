"""Code of the ``ceds_mediastinum`` bundle: network, losses, training engine, inference and metric helpers."""

from . import data, inference, losses, networks, surface_metrics, trainer

__all__ = ["data", "inference", "losses", "networks", "surface_metrics", "trainer"]
