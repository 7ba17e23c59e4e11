"""Tumour quantification from masks: per-slice area and centre, per-lesion volume, centroid, extent and diameter.

Two frames are used:

* the **slice frame** of a 2D slice: millimetres measured from the centre of the slice's first pixel along the
  array axes 0 and 1, i.e. ``(index_0 * spacing_0, index_1 * spacing_1)``. The network's quantification head is
  trained in this frame (:class:`scripts.transforms.QuantificationTargetsd`), which does not depend on where the
  slice lies in the volume nor on the image orientation.
* the **world frame**: millimetres given by the image affine (MONAI/NIfTI RAS convention), used in reports
  (:func:`quantify_mask`, :class:`scripts.transforms.SaveQuantificationd`).

All functions are pure numpy; areas are in mm^2, volumes in mm^3.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "implausible_slices",
    "lesion_components",
    "max_diameter",
    "pixel_area",
    "quantify_mask",
    "slice_frame_to_world",
    "slice_targets",
]


def pixel_area(affine: np.ndarray) -> float:
    """Area (mm^2) of one pixel of an axial slice (array axes 0 and 1) for a 3D ``affine`` (4x4)."""
    affine = np.asarray(affine, dtype=np.float64)
    return float(np.linalg.norm(np.cross(affine[:3, 0], affine[:3, 1])))


def slice_targets(mask: np.ndarray, spacing: Sequence[float]) -> tuple[float, float, float, bool]:
    """Centre and area of the foreground of one 2D slice in the slice frame.

    Args:
        mask: boolean (or 0/1) array ``[H, W]``.
        spacing: pixel spacing (mm) along array axes 0 and 1.

    Returns:
        ``(centre_0, centre_1, area, has_tumour)``: the centroid ``mean(index_a) * spacing_a`` (mm, 0 when the
        slice is empty), the area ``n_pixels * spacing_0 * spacing_1`` (mm^2) and whether any pixel is foreground.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D mask [H, W], got shape {mask.shape}.")
    n = int(mask.sum())
    area = n * float(spacing[0]) * float(spacing[1])
    if n == 0:
        return 0.0, 0.0, 0.0, False
    idx = np.nonzero(mask)
    return float(idx[0].mean() * spacing[0]), float(idx[1].mean() * spacing[1]), area, True


def slice_frame_to_world(
    centre: Sequence[float],
    slice_index: float,
    affine: np.ndarray,
    var: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Map a slice-frame centre (mm along array axes 0/1 of slice ``slice_index``) to world mm.

    The centre is first converted to voxel indices ``(c_0 / s_0, c_1 / s_1, slice_index)`` with the spacings
    ``s_a = |affine[:3, a]|`` and then mapped through ``affine``. Independent variances of the two slice-frame
    coordinates (mm^2) are propagated with the unit direction vectors ``u_a = affine[:3, a] / s_a``:
    ``var_world = sum_a u_a**2 * var_a`` (per world axis; exact for axis-aligned affines, the diagonal of the
    covariance otherwise).

    Args:
        centre: ``(c_0, c_1)`` in mm, slice frame.
        slice_index: index of the slice along array axis 2.
        affine: 4x4 voxel-to-world matrix of the volume.
        var: optional ``(var_0, var_1)`` in mm^2.

    Returns:
        ``(world [3], world_var [3] or None)``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :2], axis=0)
    index = np.array([centre[0] / spacing[0], centre[1] / spacing[1], float(slice_index), 1.0])
    world = (affine @ index)[:3]
    if var is None:
        return world, None
    directions = affine[:3, :2] / spacing
    return world, (directions**2) @ np.asarray(var, dtype=np.float64)


def lesion_components(mask: np.ndarray, connectivity: int = 3) -> tuple[np.ndarray, int]:
    """Label the 3D connected components of ``mask``, numbered 1..n by decreasing size (voxel count).

    Args:
        mask: array ``[H, W, D]``; voxels ``> 0`` are foreground.
        connectivity: 1 (faces), 2 (faces + edges) or 3 (faces + edges + corners, the default, as MONAI's
            ``get_largest_connected_component_mask``), see ``scipy.ndimage.generate_binary_structure``.

    Returns:
        ``(labels [H, W, D] int32, n)`` with 0 as background.
    """
    mask = np.asarray(mask) > 0
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, connectivity))
    if n > 1:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        order = np.argsort(-sizes, kind="stable")  # old label order[r] + 1 becomes r + 1
        remap = np.zeros(n + 1, dtype=np.int32)
        remap[order + 1] = np.arange(1, n + 1, dtype=np.int32)
        labels = remap[labels]
    return labels.astype(np.int32), int(n)


def max_diameter(mask: np.ndarray, vectors: np.ndarray, chunk: int = 256) -> float:
    """Largest distance (mm) between the centres of two foreground pixels of a 2D slice.

    Only boundary pixels are compared (the maximum is reached there). For a one-pixel lesion the diameter is 0:
    this is the centre-to-centre (Feret) length, about one pixel shorter than an edge-to-edge caliper reading.

    Args:
        mask: boolean array ``[H, W]``.
        vectors: ``[3, 2]`` world displacement (mm) of one step along array axes 0 and 1 (``affine[:3, :2]``).
        chunk: number of points compared at once (bounds the memory of the pairwise distances).
    """
    mask = np.asarray(mask, dtype=bool)
    boundary = mask & ~ndimage.binary_erosion(mask)
    points = np.argwhere(boundary).astype(np.float64) @ np.asarray(vectors, dtype=np.float64).T  # [n, 3]
    best = 0.0
    for start in range(0, len(points), chunk):
        d2 = ((points[start : start + chunk, None, :] - points[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return float(np.sqrt(best))


def quantify_mask(
    mask: np.ndarray,
    affine: np.ndarray,
    uncertainty: np.ndarray | None = None,
    connectivity: int = 3,
) -> dict:
    """Quantify the tumour of a 3D mask slice by slice (axial slices along array axis 2) and lesion by lesion.

    Args:
        mask: ``[H, W, D]``; voxels ``> 0`` are tumour.
        affine: 4x4 voxel-to-world matrix (mm).
        uncertainty: optional voxel map ``[H, W, D]``; its mean over each lesion is reported.
        connectivity: connectivity of the 3D lesion components, see :func:`lesion_components`.

    Returns:
        a JSON-serialisable dict::

            {"spacing": [s0, s1, s2] (mm), "shape": [H, W, D],
             "pixel_area_mm2": float, "voxel_volume_mm3": float, "total_volume_mm3": float,
             "slices": [{"slice": k, "n_pixels": int, "area_mm2": float, "centre_world_mm": [x, y, z]}, ...],
             "lesions": [{"lesion": 1.., "n_voxels": int, "volume_mm3": float, "centroid_world_mm": [x, y, z],
                          "slice_range": [k_first, k_last], "n_slices": int, "max_area_mm2": float,
                          "max_area_slice": int, "max_diameter_mm": float, ("mean_uncertainty": float)}, ...]}

        ``slices`` lists only slices holding tumour (ascending ``k``); ``lesions`` are the 3D connected components
        sorted by decreasing volume; ``max_diameter_mm`` is the largest in-plane (axial) diameter over the
        lesion's slices (:func:`max_diameter`); centres are centroids of voxel centres mapped through ``affine``.
    """
    mask = np.asarray(mask) > 0
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D mask [H, W, D], got shape {mask.shape}.")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {affine.shape}.")
    if uncertainty is not None:
        uncertainty = np.asarray(uncertainty, dtype=np.float64)
        if uncertainty.shape != mask.shape:
            raise ValueError(f"uncertainty shape {uncertainty.shape} differs from the mask shape {mask.shape}.")

    area_px = pixel_area(affine)
    volume_vox = float(abs(np.linalg.det(affine[:3, :3])))

    def to_world(index_mean: np.ndarray) -> list[float]:
        return [float(v) for v in (affine @ np.append(index_mean, 1.0))[:3]]

    slices = []
    for k in np.nonzero(mask.any(axis=(0, 1)))[0]:
        idx = np.argwhere(mask[:, :, k])
        centre = np.array([idx[:, 0].mean(), idx[:, 1].mean(), float(k)])
        slices.append(
            {"slice": int(k), "n_pixels": len(idx), "area_mm2": len(idx) * area_px, "centre_world_mm": to_world(centre)}
        )

    labels, n = lesion_components(mask, connectivity)
    lesions = []
    for region, box in zip(range(1, n + 1), ndimage.find_objects(labels)):
        sub = labels[box] == region
        idx = np.argwhere(sub) + np.array([s.start for s in box])
        per_slice = sub.sum(axis=(0, 1))
        k_max = int(np.argmax(per_slice))
        lesion = {
            "lesion": region,
            "n_voxels": len(idx),
            "volume_mm3": len(idx) * volume_vox,
            "centroid_world_mm": to_world(idx.mean(axis=0)),
            "slice_range": [int(box[2].start), int(box[2].stop - 1)],
            "n_slices": int((per_slice > 0).sum()),
            "max_area_mm2": float(per_slice[k_max]) * area_px,
            "max_area_slice": int(box[2].start + k_max),
            "max_diameter_mm": max(max_diameter(sub[:, :, k], affine[:3, :2]) for k in range(sub.shape[2])),
        }
        if uncertainty is not None:
            lesion["mean_uncertainty"] = float(uncertainty[labels == region].mean())
        lesions.append(lesion)

    return {
        "spacing": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "shape": [int(s) for s in mask.shape],
        "pixel_area_mm2": area_px,
        "voxel_volume_mm3": volume_vox,
        "total_volume_mm3": int(mask.sum()) * volume_vox,
        "slices": slices,
        "lesions": lesions,
    }


def implausible_slices(slices: Sequence[dict], pixel_mm2: float, min_pixels: float = 20.0,
                       area_factor: float = 2.0) -> list[str]:
    """Slices whose network quantification contradicts the predicted mask, each as a sentence a reader understands.

    The network's centre and area (evidential heads) and the mask come from the same forward pass, so they should
    agree; where they do not, one of them is wrong and the case needs review. A slice is implausible when

    * the network reports at least ``min_pixels`` pixels of tumour where the mask has none, or the mask has at least
      ``min_pixels`` pixels where the network reports none;
    * both have at least ``min_pixels`` pixels and their areas differ by more than ``area_factor`` times;
    * the network's centre lies farther from the mask's centre than the radius of a disc of the mask's area.

    Args:
        slices: the ``slices`` entries of a quantification report (:class:`scripts.transforms.SaveQuantificationd`):
            ``{"slice": k, "network": {"area_mm2", "centre_world_mm", ...}, "mask": {"area_mm2",
            "centre_world_mm"}}``; entries without ``network`` are skipped.
        pixel_mm2: area of one pixel (mm^2).
        min_pixels: smallest area, in pixels, that counts as tumour for these rules.
        area_factor: largest ratio between the two areas.

    Returns:
        one sentence per implausible slice (empty when every slice is plausible).
    """
    floor = min_pixels * pixel_mm2
    found = []
    for entry in slices:
        if "network" not in entry:
            continue
        k, net, mask = entry["slice"], entry["network"], entry["mask"]
        a_net, a_mask = net["area_mm2"], mask["area_mm2"]
        if a_net >= floor and a_mask == 0:
            found.append(f"slice {k}: the network reports {a_net:.0f} mm^2 of tumour where the mask has none")
        elif a_mask >= floor and a_net < pixel_mm2:
            found.append(f"slice {k}: the mask has {a_mask:.0f} mm^2 of tumour where the network reports none")
        elif min(a_net, a_mask) >= floor and max(a_net, a_mask) > area_factor * min(a_net, a_mask):
            found.append(f"slice {k}: network area {a_net:.0f} mm^2 against {a_mask:.0f} mm^2 in the mask")
        elif a_mask > 0 and mask["centre_world_mm"] is not None:
            distance = float(np.linalg.norm(np.subtract(net["centre_world_mm"], mask["centre_world_mm"])))
            if distance > np.sqrt(a_mask / np.pi) and a_net >= pixel_mm2:
                found.append(f"slice {k}: the network's centre lies {distance:.0f} mm from the mask's, outside it")
    return found
