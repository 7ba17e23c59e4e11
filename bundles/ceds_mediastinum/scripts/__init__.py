"""Code of the ``ceds_mediastinum`` bundle: network, losses, training engine, inference and metric helpers."""

from . import datalist, inference, losses, networks, surface_metrics, trainer

__all__ = ["datalist", "inference", "losses", "networks", "surface_metrics", "trainer"]
