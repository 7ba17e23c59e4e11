"""What a case's file names and affine say: its name and its voxel spacing, read one way everywhere.

The same file in both bundles of the collection (a test keeps the copies identical). It imports nothing from the
bundle, so repository tools load it by path (``importlib``) and name cases exactly as the bundle does.

- :func:`case_name`: the case a file, or the files of a multi-channel input, belong to.
- :class:`CaseNameFormatter`: ``SaveImaged`` output names by case.
- :func:`voxel_spacing`: the voxel spacing (mm) of a batch, from its ``MetaTensor`` affine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor

__all__ = ["NIFTI_SUFFIXES", "CaseNameFormatter", "case_name", "voxel_spacing"]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
"""File extensions stripped from a case name (matched without regard to case)."""


def case_name(filename: str | os.PathLike | Sequence[str | os.PathLike], modality_suffixes: Sequence[str] = ()) -> str:
    """The case a file belongs to: its base name without ``.nii.gz`` / ``.nii`` and without the first matching
    modality suffix.

    Args:
        filename: a file, or the files of a multi-channel input (the first one names the case).
        modality_suffixes: file-name suffixes of the channels, e.g. ``("_t2w", "_dwi")``; a name that is only a
            suffix keeps it.

    Returns:
        e.g. ``"liver_000"`` for ``["/data/liver_000_t2w.nii.gz", "/data/liver_000_dwi.nii.gz"]``.
    """
    if isinstance(filename, (list, tuple)):
        filename = filename[0]
    name = os.path.basename(os.fspath(filename))
    for ext in NIFTI_SUFFIXES:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    for suffix in modality_suffixes:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


class CaseNameFormatter:
    """``SaveImaged(output_name_formatter=...)``: outputs named by :func:`case_name` of ``filename_or_obj``.

    ``<output_dir>/<case>/<case>_<postfix>.nii.gz`` for every input, single- or multi-channel.

    Args:
        modality_suffixes: passed to :func:`case_name`.
    """

    def __init__(self, modality_suffixes: Sequence[str] = ()) -> None:
        self.modality_suffixes = tuple(modality_suffixes)

    def __call__(self, metadict: Mapping[str, Any], saver: Any) -> dict[str, Any]:
        return {"subject": case_name(metadict.get("filename_or_obj", ""), self.modality_suffixes),
                "idx": metadict.get("patch_index")}


def voxel_spacing(x: torch.Tensor, spatial_dims: int | None = None) -> torch.Tensor:
    """Voxel spacing (mm) of each item of a batch, from the lengths of its affine's columns.

    Args:
        x: ``[B, C, *spatial]``; a ``MetaTensor`` with one affine or one per item.
        spatial_dims: how many spatial axes to report (default ``x.ndim - 2``).

    Returns:
        float64 ``[B, spatial_dims]``; ones for a plain tensor.
    """
    batch = x.shape[0]
    dims = x.ndim - 2 if spatial_dims is None else spatial_dims
    if not isinstance(x, MetaTensor):
        return torch.ones(batch, dims, dtype=torch.float64)
    affine = torch.as_tensor(x.affine, dtype=torch.float64)
    if affine.ndim == 2:
        affine = affine.expand(batch, -1, -1)
    return torch.linalg.norm(affine[:, :-1, :dims], dim=1)
