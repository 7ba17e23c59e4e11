"""Synthetic phantom datasets for the two bundles: multi-sequence liver MRI and mediastinal CT.

The phantoms stand in for the private data of the original studies so that every bundle can be trained, evaluated
and tested end to end. They are not realistic enough for any clinical conclusion. Both generators:

- define their anatomy in coordinates normalised to the field of view (x, y, z in [-1, 1]): the body fills the
  in-plane field of view, which is therefore a *scaled-down* abdomen / thorax (about 100 mm instead of 350 mm
  across); organ shapes are ellipsoids and smooth random blobs;
- store arrays in (x, y, z) order with z the slice axis and a RAS affine (x towards the patient's right,
  y anterior, z superior) with the voxel spacing on the diagonal and a plausible non-zero origin;
- are deterministic: case ``i`` depends only on ``(seed, i)`` (not on ``n_cases``), and files are byte-identical
  for the same arguments (gzip without a timestamp);
- write ``imagesTr/``, ``labelsTr/`` (uint8 0/1 tumour), ``organsTr/`` (uint8 organ labels) and an MSD-style
  ``dataset.json`` listing every case with paths relative to the output folder.

:func:`datalist` splits such a folder into ``datalist_<pct>.json`` files (labelled / unlabeled / validation /
test) for semi-supervised training with a given fraction of labels.

Command line (python-fire)::

    python scripts/phantoms.py liver_mri --out_dir D --n_cases 24 --seed 0
    python scripts/phantoms.py mediastinal_ct --out_dir D --n_cases 24 --seed 0
    python scripts/phantoms.py datalist --data_dir D --label_ratio 0.1
    python scripts/phantoms.py appearance_modes_by_split D/datalist_10.json
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Sequence

import fire
import nibabel as nib
import numpy as np
from scipy import ndimage

LIVER_SEQUENCES = ("t2w", "dwi")
LIVER_CE_PHASES = ("art", "pv", "delay")
LIVER_ORGANS = {"0": "background", "1": "liver", "2": "spleen", "3": "kidney", "4": "spine"}
CT_ORGANS = {
    "0": "background",
    "1": "lung",
    "2": "heart",
    "3": "great vessels",
    "4": "bone",
    "5": "airway",
    "6": "mediastinum",
}
LESION_TYPES = ("hcc", "metastasis", "haemangioma", "cyst", "t2_dark", "dwi_only")
# relative frequency of each type; a case draws its lesions' types among ``lesion_types`` with these weights
LESION_WEIGHTS = {"hcc": 0.35, "metastasis": 0.35, "haemangioma": 0.15, "cyst": 0.15, "t2_dark": 0.15,
                  "dwi_only": 0.15}
# benign foci (label 0), isointense to the liver in every CE phase; T2WI / DWI factors (times the per-focus
# conspicuity and ``t2_contrast`` / ``dwi_contrast``) of the body and of a central scar (normalised radius < 0.35)
MIMIC_TYPES = {
    "t2_bright": {"body": (1.0, 0.0), "scar": (1.0, 0.0)},  # bright in T2WI like an HCC, iso in DWI
    "scar": {"body": (0.5, 0.9), "scar": (3.0, 0.0)},  # FNH-like: like an HCC in T2WI / DWI but for a bright scar
    "siderotic": {"body": (-0.8, -0.5), "scar": (-0.8, -0.5)},  # dark in T2WI and DWI
}
# generator arguments added after benchmark results were recorded, whose defaults draw exactly as before they existed
ADDED_ARGUMENTS = ("appearance_modes",)
# with ``appearance_modes``: the length of a lesion's or mimic's (T2WI, DWI) log-contrast direction (the signal is
# the liver's times ``exp(length * direction)``, so that darker and brighter modes are alike), in units of
# ``t2_contrast`` / ``dwi_contrast`` times its conspicuity factor, and the ratio of the frequencies of consecutive
# modes of a class (the first mode the most frequent)
MODE_CONTRAST = 2.0
MODE_FREQUENCY_RATIO = 0.5

Grid = tuple[np.ndarray, np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------------


def case_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """Random generator of one case: depends only on the dataset ``stream``, the ``seed`` and the case ``index``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(stream)]))


def normalised_grid(shape: Sequence[int]) -> Grid:
    """Broadcastable coordinates in [-1, 1] along each axis of a (x, y, z) volume."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) if n > 1 else np.zeros(1, np.float32) for n in shape]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def ellipse(grid: Grid, center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised radius of an axis-aligned ellipsoid (< 1 inside); ``radii[2] = inf`` gives an elliptic cylinder."""
    x, y, z = grid
    r2 = ((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
    if np.isfinite(radii[2]):
        r2 = r2 + ((z - center[2]) / radii[2]) ** 2
    return np.sqrt(np.broadcast_to(r2, np.broadcast_shapes(x.shape, y.shape, z.shape)))


def blob(
    grid: Grid, center: Sequence[float], radii: Sequence[float], rng: np.random.Generator, roughness: float = 0.2
) -> np.ndarray:
    """Normalised radius of an irregular blob: an ellipsoid whose surface is perturbed by smooth radial noise.

    The boundary radius along the unit direction ``u`` is ``1 + roughness * f(u)`` with ``f`` a normalised sum of
    a few random plane waves on the sphere, so the shape is smooth, star-shaped and different for every draw.

    Args:
        grid: coordinates from :func:`normalised_grid`.
        center: blob centre (x, y, z) in normalised coordinates.
        radii: semi-axes (x, y, z) of the underlying ellipsoid.
        rng: random generator.
        roughness: relative amplitude of the radial perturbation.

    Returns:
        array of the volume's shape: radius divided by the boundary radius (< 1 inside, 0 at the centre).
    """
    x, y, z = grid
    d = [(x - center[0]) / radii[0], (y - center[1]) / radii[1], (z - center[2]) / radii[2]]
    r = np.sqrt(np.broadcast_to(d[0] ** 2 + d[1] ** 2 + d[2] ** 2, np.broadcast_shapes(x.shape, y.shape, z.shape)))
    r_safe = np.maximum(r, 1e-6)
    n_waves = 6
    directions = rng.normal(size=(n_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    freqs = rng.uniform(1.5, 4.0, n_waves)
    phases = rng.uniform(0, 2 * np.pi, n_waves)
    amps = rng.uniform(0.5, 1.0, n_waves)
    f = np.zeros_like(r)
    for w, k, p, a in zip(directions, freqs, phases, amps):
        f += a * np.cos(k * (w[0] * d[0] + w[1] * d[1] + w[2] * d[2]) / r_safe + p)
    f /= np.sqrt(0.5 * np.sum(amps**2))
    return r / np.maximum(1.0 + roughness * f, 0.3)


def tube(grid: Grid, points: np.ndarray, radius: float) -> np.ndarray:
    """Mask of a tube of ``radius`` (normalised units) along a polyline sampled densely by ``points`` [N, 3]."""
    x, y, z = grid
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    mask = np.zeros(shape, bool)
    for p in points:
        mask |= ((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) < radius**2
    return mask


def polyline(*nodes: Sequence[float], n: int = 24) -> np.ndarray:
    """``n`` points per segment linearly interpolated between the given 3-D nodes; returns [N, 3]."""
    nodes_a = np.asarray(nodes, dtype=np.float32)
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    return np.concatenate([a + t * (b - a) for a, b in zip(nodes_a[:-1], nodes_a[1:])])


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation (float32)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap", truncate=3.0)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def bias_field(rng: np.random.Generator, grid: Grid, strength: float) -> np.ndarray:
    """Smooth multiplicative MR bias field: exp of a random quadratic polynomial of the coordinates."""
    x, y, z = grid
    terms = [x, y, z * 0.5, x * y, x**2 - 0.33, y**2 - 0.33]
    coeffs = rng.normal(0.0, strength, len(terms))
    log_field = sum(c * t for c, t in zip(coeffs, terms))
    return np.exp(np.broadcast_to(log_field, np.broadcast_shapes(x.shape, y.shape, z.shape))).astype(np.float32)


def ras_affine(spacing: Sequence[float], shape: Sequence[int], rng: np.random.Generator, z_origin: float) -> np.ndarray:
    """RAS affine with ``spacing`` on the diagonal and a plausible origin (volume roughly centred in x/y)."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[0, 3] = -0.5 * (shape[0] - 1) * spacing[0] + rng.uniform(-15, 15)
    affine[1, 3] = -0.5 * (shape[1] - 1) * spacing[1] + rng.uniform(-30, 0)
    affine[2, 3] = z_origin
    return np.round(affine, 3).astype(np.float32).astype(np.float64)  # exactly representable in the header


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI-1 ``.nii.gz`` deterministically (no gzip timestamp or file name), units mm."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def write_dataset_json(out_dir: Path, info: dict, records: list[dict]) -> str:
    """Write the MSD-style ``dataset.json`` (``info`` plus ``numTraining`` and ``training``); return its path."""
    path = out_dir / "dataset.json"
    path.write_text(json.dumps({**info, "numTraining": len(records), "training": records}, indent=2) + "\n")
    return str(path)


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


# ---------------------------------------------------------------------------------------------------------------
# liver MRI
# ---------------------------------------------------------------------------------------------------------------

# tissue -> signal per sequence (arbitrary units, liver parenchyma 0.2-0.6): fat-suppressed T2WI, DWI at a high
# b-value (fluid and fat dark, spleen / kidney bright) and fat-suppressed T1 after contrast in three phases
_MR_TISSUES = ("air", "fat", "muscle", "liver", "spleen", "kidney_cortex", "kidney_medulla", "bone", "csf", "fluid",
               "aorta", "ivc", "portal", "hepatic_vein", "stomach_wall", "bowel_fat", "gas")
_MR_SIGNAL = {
    #                 t2w   dwi   art   pv    delay
    "air":           (0.00, 0.00, 0.00, 0.00, 0.00),
    "fat":           (0.12, 0.04, 0.10, 0.11, 0.11),
    "muscle":        (0.14, 0.09, 0.28, 0.34, 0.35),
    "liver":         (0.25, 0.20, 0.40, 0.60, 0.55),
    "spleen":        (0.45, 0.42, 0.62, 0.60, 0.50),
    "kidney_cortex": (0.42, 0.38, 0.95, 0.70, 0.60),
    "kidney_medulla": (0.55, 0.35, 0.35, 0.75, 0.70),
    "bone":          (0.18, 0.05, 0.25, 0.30, 0.30),
    "csf":           (0.95, 0.06, 0.05, 0.06, 0.08),
    "fluid":         (1.00, 0.06, 0.06, 0.06, 0.07),
    "aorta":         (0.05, 0.02, 1.00, 0.65, 0.50),
    "ivc":           (0.10, 0.03, 0.20, 0.65, 0.50),
    "portal":        (0.08, 0.03, 0.45, 0.85, 0.55),
    "hepatic_vein":  (0.08, 0.03, 0.15, 0.75, 0.55),
    "stomach_wall":  (0.30, 0.25, 0.55, 0.55, 0.45),
    "bowel_fat":     (0.17, 0.06, 0.16, 0.20, 0.20),
    "gas":           (0.01, 0.00, 0.00, 0.00, 0.00),
}
_MR_TABLE = np.array([_MR_SIGNAL[t] for t in _MR_TISSUES], dtype=np.float32)  # [tissue, sequence]
_T = {name: i for i, name in enumerate(_MR_TISSUES)}


def _liver_anatomy(grid: Grid, shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Tissue-index map and organ labels of one abdomen (slab of the upper abdomen, liver dome at the top)."""
    tissue = np.zeros(shape, np.uint8)
    organs = np.zeros(shape, np.uint8)
    nz = shape[2]
    body_r = (rng.uniform(0.86, 0.96), rng.uniform(0.68, 0.78), np.inf)
    body_c = (rng.uniform(-0.03, 0.03), rng.uniform(-0.04, 0.02), 0.0)
    body = ellipse(grid, body_c, body_r) < 1.0
    fat_t, wall_t = rng.uniform(0.05, 0.11), rng.uniform(0.035, 0.05)
    inner = ellipse(grid, body_c, (body_r[0] - fat_t, body_r[1] - fat_t, np.inf)) < 1.0
    cavity = ellipse(grid, body_c, (body_r[0] - fat_t - wall_t, body_r[1] - fat_t - wall_t, np.inf)) < 1.0
    tissue[body] = _T["fat"]
    tissue[inner] = _T["muscle"]
    tissue[cavity] = _T["bowel_fat"]

    # spine: vertebral body, canal, posterior arch, paraspinal muscles (posterior = -y)
    back = body_c[1] - body_r[1] + fat_t
    vb_c = (0.0, back + 0.24, 0.0)
    vb_r = rng.uniform(0.09, 0.11)
    canal_c = (0.0, vb_c[1] - vb_r - 0.05, 0.0)
    for side in (-1, 1):
        tissue[ellipse(grid, (side * 0.17, back + 0.11, 0), (0.12, 0.09, np.inf)) < 1.0] = _T["muscle"]
    arch = (ellipse(grid, canal_c, (0.085, 0.08, np.inf)) < 1.0) | (
        ellipse(grid, (0.0, canal_c[1] - 0.09, 0), (0.025, 0.07, np.inf)) < 1.0)
    vertebra = (ellipse(grid, vb_c, (vb_r * 1.1, vb_r, np.inf)) < 1.0) | arch
    tissue[vertebra] = _T["bone"]
    tissue[ellipse(grid, canal_c, (0.045, 0.04, np.inf)) < 1.0] = _T["csf"]
    organs[vertebra] = 4
    occupied = vertebra.copy()

    # vessels in front of the spine
    aorta = ellipse(grid, (-0.06, vb_c[1] + vb_r + 0.05, 0), (0.05, 0.05, np.inf)) < 1.0
    ivc = ellipse(grid, (0.13, vb_c[1] + vb_r + 0.07, 0), (0.065, 0.045, np.inf)) < 1.0
    tissue[aorta] = _T["aorta"]
    tissue[ivc] = _T["ivc"]
    occupied |= aorta | ivc

    # kidneys (lower slab), cortex and medulla; the right one lies lower
    for side, zc in ((1, rng.uniform(-0.9, -0.6)), (-1, rng.uniform(-0.7, -0.4))):
        rho = blob(grid, (side * rng.uniform(0.3, 0.36), vb_c[1] + 0.02, zc), (0.11, 0.15, 0.75), rng, 0.08)
        kidney = (rho < 1.0) & cavity & ~occupied
        tissue[kidney] = _T["kidney_cortex"]
        tissue[kidney & (rho < 0.62)] = _T["kidney_medulla"]
        organs[kidney] = 3
        occupied |= kidney

    # spleen (left posterior, upper slab)
    rho = blob(grid, (-rng.uniform(0.52, 0.6), rng.uniform(-0.25, -0.1), rng.uniform(0.1, 0.5)),
               (rng.uniform(0.14, 0.2), rng.uniform(0.22, 0.3), 0.9), rng, 0.12)
    spleen = (rho < 1.0) & cavity & ~occupied
    tissue[spleen] = _T["spleen"]
    organs[spleen] = 2
    occupied |= spleen

    # stomach (left anterior): wall, fluid content, sometimes an air-fluid level (gas anteriorly)
    st_c = (-rng.uniform(0.22, 0.35), rng.uniform(0.15, 0.3), rng.uniform(0.2, 0.6))
    rho = blob(grid, st_c, (0.22, 0.17, 0.8), rng, 0.15)
    stomach = (rho < 1.0) & cavity & ~occupied
    tissue[stomach] = _T["stomach_wall"]
    tissue[stomach & (rho < 0.8)] = _T["fluid"]
    if rng.random() < 0.5:
        tissue[stomach & (rho < 0.8) & (grid[1] > st_c[1] + 0.05)] = _T["gas"]
    occupied |= stomach

    # gallbladder (sometimes), under the liver
    if rng.random() < 0.7:
        rho = blob(grid, (rng.uniform(0.15, 0.3), rng.uniform(0.05, 0.2), rng.uniform(-0.8, -0.3)),
                   (0.07, 0.1, 0.45), rng, 0.1)
        gallbladder = (rho < 1.0) & cavity & ~occupied
        tissue[gallbladder] = _T["fluid"]
        occupied |= gallbladder

    # liver: large blob on the right crossing the midline anteriorly, bigger towards the dome
    liver_c = (rng.uniform(0.22, 0.32), rng.uniform(0.0, 0.08), rng.uniform(0.2, 0.5))
    rho = blob(grid, liver_c, (rng.uniform(0.55, 0.65), rng.uniform(0.5, 0.6), 1.5), rng, 0.12)
    liver = (rho < 1.0) & cavity & ~occupied
    liver = ndimage.binary_opening(liver, np.ones((3, 3, 1), bool))
    tissue[liver] = _T["liver"]
    organs[liver] = 1

    # intrahepatic vessels: intersections of zero sets of two smooth random fields give curvilinear tubes
    sigma = (0.08 * shape[0], 0.08 * shape[1], 0.06 * nz)
    f1, f2, f3 = (smooth_noise(rng, shape, sigma) for _ in range(3))
    vessels = liver & (np.abs(f1) < 0.14) & (np.abs(f2) < 0.5)
    tissue[vessels & (f3 > 0)] = _T["portal"]
    tissue[vessels & (f3 <= 0)] = _T["hepatic_vein"]
    return tissue, organs


def _lesion_signal(
    kind: str,
    rho: np.ndarray,
    spots: np.ndarray,
    t2_contrast: float,
    dwi_contrast: float,
    ce_contrast: float,
    cyst_like_fluid: bool = True,
) -> np.ndarray:
    """Signal of a lesion in (t2w, dwi, art, pv, delay) for voxels at normalised radius ``rho``; shape [5, N].

    ``spots`` in [-1, 1] (smooth noise) makes the nodular / mosaic patterns. T2WI/DWI deltas are relative to the
    liver and scaled by ``t2_contrast`` / ``dwi_contrast``; CE deltas are scaled by ``ce_contrast``. A cyst with
    ``cyst_like_fluid`` takes the T2WI / DWI signal of fluid (gallbladder, stomach content), as it does in the CE
    phases, whatever the contrast scales.
    """
    liver = _MR_SIGNAL["liver"]
    rim = rho > 0.65
    n = rho.shape[0]
    out = np.empty((5, n), np.float32)
    if kind == "hcc":  # mild T2/DWI hyper, arterial hyper-enhancement with washout and a delayed capsule
        t2, dwi = 1.0 + t2_contrast, 1.0 + dwi_contrast
        ce = [np.full(n, 0.88 + 0.06 * spots), np.full(n, 0.43), np.where(rho > 0.88, 0.72, 0.38)]
    elif kind == "metastasis":  # rim enhancement, hypo-enhancing core
        t2, dwi = 1.0 + 1.2 * t2_contrast, 1.0 + 1.3 * dwi_contrast
        ce = [np.where(rim, 0.68, 0.22), np.where(rim, 0.48, 0.28), np.where(rim, 0.45, 0.36)]
    elif kind == "haemangioma":  # bright T2, peripheral nodular enhancement filling in centripetally
        t2, dwi = 1.0 + 2.5 * t2_contrast, 1.0 + 0.8 * dwi_contrast
        nodules = rim & (spots > 0.2)
        ce = [np.where(nodules, 0.95, 0.16), np.where(rho > 0.4, 0.78, 0.22), np.full(n, 0.62)]
    elif kind == "cyst":  # very bright T2, dark at high b-value, no enhancement
        t2, dwi = 1.0 + 4.0 * t2_contrast, 1.0 - 0.6 * dwi_contrast
        ce = [np.full(n, 0.06), np.full(n, 0.06), np.full(n, 0.07)]
    elif kind == "t2_dark":  # fibrous / siderotic: darker than the liver in T2, bright at high b-value
        t2, dwi = 1.0 - 0.8 * t2_contrast, 1.0 + dwi_contrast
        ce = [np.full(n, 0.70 + 0.05 * spots), np.full(n, 0.40), np.full(n, 0.30)]
    elif kind == "dwi_only":  # small-metastasis-like: isointense in T2, seen by restricted diffusion only
        t2, dwi = 1.0, 1.0 + 1.3 * dwi_contrast
        ce = [np.full(n, 0.24), np.where(rim, 0.45, 0.32), np.full(n, 0.30)]
    else:
        raise ValueError(f"unknown lesion type {kind!r}")
    out[0] = liver[0] * t2
    out[1] = liver[1] * dwi
    for i, values in enumerate(ce):
        out[2 + i] = liver[2 + i] + ce_contrast * (values - liver[2 + i])
    if kind == "cyst" and cyst_like_fluid:
        out[:2] = np.array(_MR_SIGNAL["fluid"][:2], np.float32)[:, None]
    return out


def liver_case(
    index: int,
    seed: int = 0,
    size: int = 128,
    n_slices: int = 20,
    max_lesions: int = 3,
    lesion_radius: Sequence[float] = (0.2, 0.35),
    t2_contrast: float = 0.25,
    dwi_contrast: float = 0.35,
    conspicuity: Sequence[float] = (0.6, 1.7),
    ce_contrast: float = 1.0,
    noise: float = 1.0,
    misregistration: float = 1.5,
    cyst_like_fluid: bool = True,
    max_mimics: int = 0,
    lesion_types: Sequence[str] = LESION_TYPES[:4],
    mimic_types: Sequence[str] = ("t2_bright",),
    appearance_modes: int = 0,
) -> dict:
    """Generate one liver-MRI case in memory (see :func:`liver_mri` for the arguments).

    Returns:
        dict with ``images`` {sequence: float32 [size, size, n_slices]}, ``label`` (uint8 0/1), ``organs`` (uint8),
        ``affine`` (4x4), ``dwi_shift`` (in-plane voxels), ``lesions`` (list of lesion types) and ``lesion_masks``
        (list of bool [size, size, n_slices], one per entry of ``lesions``, same order; lesions may overlap, their
        union is ``label``; not written to disk, for per-lesion analyses such as ``scripts/liver_errors.py``),
        ``mimic_masks`` and ``mimics`` (kinds) likewise, and with ``appearance_modes`` the mode of each lesion and
        mimic, ``lesion_modes`` / ``mimic_modes`` (``None`` without modes, and for a cyst with ``cyst_like_fluid``).
    """
    rng = case_rng(seed, index, 1)
    shape = (size, size, n_slices)
    grid = normalised_grid(shape)
    spacing = (rng.uniform(0.7, 0.9),) * 2 + (rng.uniform(5.0, 7.0),)
    affine = ras_affine(spacing, shape, rng, z_origin=rng.uniform(-250.0, -150.0))
    tissue, organs = _liver_anatomy(grid, shape, rng)
    liver = organs == 1

    # lesions inside the liver eroded by one voxel in-plane
    liver_core = ndimage.binary_erosion(liver, np.ones((3, 3, 1), bool))
    label = np.zeros(shape, np.uint8)
    n_lesions = int(rng.choice(max_lesions + 1, p=_lesion_count_probs(max_lesions)))
    spots = np.clip(smooth_noise(rng, shape, (1.5, 1.5, 0.5)), -1.0, 1.0)
    lesion_voxels: list[tuple[np.ndarray, np.ndarray]] = []
    kinds: list[str] = []
    factors: list[float] = []
    for _ in range(n_lesions):
        weights = np.array([LESION_WEIGHTS[t] for t in lesion_types])
        kind = str(rng.choice(list(lesion_types), p=weights / weights.sum()))
        factor = _uniform(rng, conspicuity)
        rho = _random_blob(rng, grid, liver_core, lesion_radius, size, anywhere_if_too_small=True)
        if rho is None:
            break
        mask = (rho < 1.0) & liver_core
        if not mask.any():
            continue
        label[mask] = 1
        lesion_voxels.append((mask, rho[mask]))
        kinds.append(kind)
        factors.append(factor)
    mimics = _mimics(case_rng(seed, index, 2), grid, liver_core & ~ndimage.binary_dilation(label > 0, iterations=2),
                     max_mimics, lesion_radius, conspicuity, size, mimic_types)

    # with appearance_modes, the T2WI / DWI contrast of every lesion (cysts with cyst_like_fluid aside) and mimic
    # is a direction of the (T2WI, DWI) plane, from a stream of its own so that shapes and places stay as without
    directions, modes = None, ([None] * len(kinds), [None] * len(mimics))
    if appearance_modes > 0:
        mode_rng = case_rng(seed, index, 3)
        modes = ([_appearance_mode(mode_rng, appearance_modes) for _ in kinds],
                 [_appearance_mode(mode_rng, appearance_modes) for _ in mimics])
        directions = ([_mode_direction(j, appearance_modes, True) for j in modes[0]],
                      [_mode_direction(j, appearance_modes, False) for j in modes[1]])
        modes = ([None if k == "cyst" and cyst_like_fluid else j for j, k in zip(modes[0], kinds)], modes[1])

    # clean signals per sequence: tissue lookup, parenchymal texture, lesions, partial-volume blur
    texture = smooth_noise(rng, shape, (3.0, 3.0, 1.0))
    images = {}
    for s, name in enumerate(LIVER_SEQUENCES + LIVER_CE_PHASES):
        img = _MR_TABLE[tissue, s] * (1.0 + 0.05 * texture)
        for j, ((mask, rho_in), kind, f) in enumerate(zip(lesion_voxels, kinds, factors)):
            sig = _lesion_signal(kind, rho_in, spots[mask], f * t2_contrast, f * dwi_contrast, ce_contrast,
                                 cyst_like_fluid)[s]
            if directions is not None and s < 2 and not (kind == "cyst" and cyst_like_fluid):
                contrast = (t2_contrast, dwi_contrast)[s] * f * MODE_CONTRAST
                sig = np.full_like(sig, _MR_SIGNAL["liver"][s] * np.exp(contrast * directions[0][j][s]))
            img[mask] = sig * (1.0 + 0.04 * texture[mask])
        for j, (mask, rho_in, kind, f) in enumerate(mimics):  # iso to the liver in every CE phase
            contrast = (t2_contrast, dwi_contrast, 0.0, 0.0, 0.0)[s] * f
            if directions is not None:
                log_contrast = MODE_CONTRAST * (directions[1][j][s] if s < 2 else 0.0) * contrast
                delta = np.full(rho_in.shape, np.expm1(log_contrast))
            else:
                body, scar = (MIMIC_TYPES[kind][part][s] if s < 2 else 0.0 for part in ("body", "scar"))
                delta = np.where(rho_in < 0.35, scar, body) * contrast
            img[mask] = _MR_SIGNAL["liver"][s] * (1.0 + delta) * (1.0 + 0.04 * texture[mask])
        images[name] = ndimage.gaussian_filter(img, (0.6, 0.6, 0.3))

    # DWI: lower resolution and a slight in-plane misregistration (the label follows T2WI / CE)
    shift = rng.uniform(-misregistration, misregistration, 2)
    images["dwi"] = ndimage.shift(ndimage.gaussian_filter(images["dwi"], (0.8, 0.8, 0)), (*shift, 0.0), order=1)

    # bias field and Rician noise (sigma relative to the liver signal; DWI has the lowest SNR)
    sigma = {"t2w": 0.045, "dwi": 0.055, "art": 0.03, "pv": 0.03, "delay": 0.03}
    for name in images:
        clean = images[name] * bias_field(rng, grid, 0.12)
        sd = noise * sigma[name]
        real = clean + rng.normal(0.0, sd, shape).astype(np.float32)
        imag = rng.normal(0.0, sd, shape).astype(np.float32)
        images[name] = np.round(1000.0 * np.sqrt(real**2 + imag**2)).astype(np.float32)  # integer-valued, as scanners
    return {"images": images, "label": label, "organs": organs, "affine": affine, "dwi_shift": shift, "lesions": kinds,
            "lesion_masks": [mask for mask, _ in lesion_voxels], "mimic_masks": [m[0] for m in mimics],
            "mimics": [m[2] for m in mimics], "lesion_modes": modes[0], "mimic_modes": modes[1]}


def _random_blob(
    rng: np.random.Generator,
    grid: Grid,
    region: np.ndarray,
    lesion_radius: Sequence[float],
    size: int,
    anywhere_if_too_small: bool = False,
) -> np.ndarray | None:
    """Normalised radius map of an irregular blob (a lesion or a mimic) centred in ``region``.

    The radius is drawn from ``lesion_radius`` (z twice the in-plane radius, each axis jittered by 0.8-1.2) and the
    centre from the voxels of ``region`` at least about a quarter of the radius away from its border; with
    ``anywhere_if_too_small``, from all of ``region`` when no voxel is that deep.

    Returns:
        the ``blob`` map (``< 1`` inside), or ``None`` when ``region`` has no voxel to centre it on.
    """
    r = _uniform(rng, lesion_radius)
    radii = (r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2), 2.0 * r * rng.uniform(0.8, 1.2))
    depth = max(1, int(r * size / 4))  # keep the centre away from the region's surface
    centre_region = ndimage.binary_erosion(region, np.ones((3, 3, 1), bool), iterations=depth)
    if anywhere_if_too_small and not centre_region.any():
        centre_region = region
    candidates = np.argwhere(centre_region)
    if len(candidates) == 0:
        return None
    centre_vox = candidates[rng.integers(len(candidates))]
    centre = [float(grid[a].reshape(-1)[centre_vox[a]]) for a in range(3)]
    return blob(grid, centre, radii, rng, roughness=rng.uniform(0.15, 0.35))


def _mimics(
    rng: np.random.Generator,
    grid: Grid,
    allowed: np.ndarray,
    max_mimics: int,
    lesion_radius: Sequence[float],
    conspicuity: Sequence[float],
    size: int,
    kinds: Sequence[str] = ("t2_bright",),
) -> list[tuple[np.ndarray, np.ndarray, str, float]]:
    """0 to ``max_mimics`` (uniform) benign foci inside ``allowed`` (the liver away from the lesions): irregular blobs
    of the lesions' sizes, each of a kind of ``MIMIC_TYPES`` drawn uniformly from ``kinds`` and with a conspicuity
    factor drawn as a lesion's. They are not tumour (label 0). Drawn from their own random stream, so that
    ``max_mimics=0`` leaves the case unchanged (and one kind draws as before ``kinds`` existed).

    Returns:
        ``[(mask, normalised radius inside the mask, kind, conspicuity factor), ...]``.
    """
    out: list[tuple[np.ndarray, np.ndarray, str, float]] = []
    for _ in range(int(rng.integers(max_mimics + 1)) if max_mimics > 0 else 0):
        kind = str(rng.choice(list(kinds))) if len(kinds) > 1 else kinds[0]
        factor = _uniform(rng, conspicuity)
        rho = _random_blob(rng, grid, allowed, lesion_radius, size)
        if rho is None:
            break
        mask = (rho < 1.0) & allowed
        if mask.any():
            out.append((mask, rho[mask], kind, factor))
            allowed = allowed & ~ndimage.binary_dilation(mask, iterations=2)
    return out


def _appearance_mode(rng: np.random.Generator, modes: int) -> int:
    """A mode ``j`` of ``0 .. modes - 1`` for ``appearance_modes``, drawn with a frequency proportional to
    ``MODE_FREQUENCY_RATIO ** j``."""
    weights = MODE_FREQUENCY_RATIO ** np.arange(modes)
    return int(rng.choice(modes, p=weights / weights.sum()))


def _mode_direction(j: int, modes: int, tumour: bool) -> tuple[float, float]:
    """The unit direction ``(cos, sin)`` of mode ``j`` in the (T2WI, DWI) log-contrast plane: ``2 * modes``
    directions evenly spread, tumour modes at the even ones, benign modes at the odd ones."""
    theta = (2 * j + (0.5 if tumour else 1.5)) * np.pi / modes
    return float(np.cos(theta)), float(np.sin(theta))


def _lesion_count_probs(max_lesions: int) -> np.ndarray:
    """Probabilities of 0..max_lesions lesions: few lesion-free cases, most with one or two."""
    weights = np.array([0.1] + [0.4 / (k**0.6) for k in range(1, max_lesions + 1)])
    return weights / weights.sum()


def liver_mri(
    out_dir: str,
    n_cases: int = 24,
    seed: int = 0,
    size: int = 128,
    n_slices: int = 20,
    max_lesions: int = 3,
    lesion_radius: Sequence[float] = (0.2, 0.35),
    t2_contrast: float = 0.25,
    dwi_contrast: float = 0.35,
    conspicuity: Sequence[float] = (0.6, 1.7),
    ce_contrast: float = 1.0,
    noise: float = 1.0,
    misregistration: float = 1.5,
    cyst_like_fluid: bool = True,
    max_mimics: int = 0,
    lesion_types: Sequence[str] = LESION_TYPES[:4],
    mimic_types: Sequence[str] = ("t2_bright",),
    appearance_modes: int = 0,
) -> str:
    """Write a multi-sequence liver-MRI phantom dataset (T2WI, DWI and three contrast-enhanced phases).

    Each case is a slab of a scaled-down upper abdomen (body outline, subcutaneous fat, muscle wall, liver with
    portal / hepatic veins, spleen, kidneys, spine, aorta, IVC, stomach, gallbladder) with 0 to ``max_lesions``
    irregular liver lesions of four types whose appearance depends on the sequence:

    ====================  ===================  ===========================  ==========================
    type                  T2WI / DWI           arterial                     portal venous / delayed
    ====================  ===================  ===========================  ==========================
    HCC-like              slightly bright      hyper-enhancing              washout, delayed capsule
    metastasis-like       slightly bright      rim enhancement              hypo-enhancing core
    haemangioma-like      bright T2            peripheral nodules           centripetal fill-in
    cyst                  fluid: very bright   no enhancement               no enhancement
                          T2, dark DWI
    ====================  ===================  ===========================  ==========================

    Lesions are thus conspicuous in the CE phases but only weakly in T2WI/DWI (lesion-to-liver contrast of the
    order of the noise), which is what a CE teacher / T2WI+DWI student exploits. Images carry Rician noise, a
    smooth multiplicative bias field per sequence, and the DWI (blurrier, lowest SNR) is shifted in-plane by
    up to ``misregistration`` voxels relative to T2WI and the CE phases, which the label follows.
    Spacing: in-plane U(0.7, 0.9) mm, slices U(5, 7) mm.

    Args:
        out_dir: output folder (created).
        n_cases: number of cases ``liver_000`` ...
        seed: dataset seed; case ``i`` depends only on ``(seed, i)``.
        size: in-plane matrix (size x size).
        n_slices: number of slices (z, last array axis).
        max_lesions: most lesions per case (0 to ``max_lesions``; about 10 % of cases have none).
        lesion_radius: range of lesion radii as a fraction of the half field of view (in-plane; z twice that). The
            default, 0.2-0.35 of about 50 mm, gives radii of about 10-17.5 mm: 8-14 pixels at the 1.25 mm of the
            ``cpu`` benchmark profile, so that every lesion spans enough pixels to be learned in a short CPU run and
            its boundary does not cap the Dice (with 0.13-0.28, 5-11 pixels, supervised training with every label
            plateaued at a validation Dice of 0.79-0.84; with 0.2-0.35 at about 0.90).
        t2_contrast: relative lesion-to-liver signal difference of the least conspicuous type (HCC) in T2WI.
        dwi_contrast: same in DWI.
        conspicuity: range of a per-lesion factor on the T2WI and DWI contrasts (not on the CE phases): lesions
            from faint to clearly visible without contrast agent, so that a few labelled cases do not show the
            range a model must learn, while every lesion stays conspicuous in the CE phases. 0.6-1.7 was chosen on
            the validation split (``docs/benchmarks.md``, *Phantom difficulty*): with 0.3-1.7 supervised training
            on every label plateaued at a validation Dice near 0.72 (the faintest lesions sit in the noise).
        ce_contrast: scale of the lesion-to-liver differences in the CE phases (1 = default appearance).
        noise: scale of the noise standard deviations (1 = default: liver SNR ~5.5 T2WI, ~3.6 DWI, >13 CE).
        misregistration: largest in-plane DWI shift in voxels.
        cyst_like_fluid: cysts take the signal of fluid in T2WI and DWI (default), as they do in the CE phases,
            so that in every sequence only their place in the liver tells them from the gallbladder or the stomach
            content; ``False``: the T2WI / DWI contrast of the other types, scaled by ``conspicuity`` (before
            ``docs/benchmarks.md`` found that a CE teacher then lost to its T2WI + DWI student on cysts alone).
        max_mimics: most benign T2WI-bright foci per case (0 to ``max_mimics``, uniform): label 0, as bright as an
            HCC-like lesion in T2WI but isointense to the liver in DWI and every CE phase, so that the CE phases tell
            them from tumour at a glance while T2WI + DWI need the DWI signal. 0 (default) leaves every case as
            without the argument (the mimics draw from their own random stream).
        lesion_types: the types a lesion is drawn from, with the weights of ``LESION_WEIGHTS``; besides the four of
            the table, ``"t2_dark"`` (darker than the liver in T2WI, bright in DWI, hypo-enhancing late) and
            ``"dwi_only"`` (isointense in T2WI, seen by restricted diffusion only). The default, the four of the
            table, draws exactly as before the other two existed.
        mimic_types: the kinds of the benign foci (keys of ``MIMIC_TYPES``, drawn uniformly): ``"t2_bright"``
            (the default, described under ``max_mimics``), ``"scar"`` (FNH-like: the T2WI / DWI signal of an HCC-like
            lesion but for a T2WI-bright central scar) and ``"siderotic"`` (darker than the liver in T2WI and DWI).
            Every kind is isointense in the CE phases, which therefore tell all of them from tumour alike, while
            T2WI + DWI need examples of each.
        appearance_modes: 0 (default) keeps the appearances above. ``n > 0`` gives every lesion (but a cyst with
            ``cyst_like_fluid``) and every mimic a T2WI / DWI log-contrast of length ``MODE_CONTRAST`` times its
            conspicuity factor along one of ``2 n`` directions evenly spread over the (T2WI, DWI) contrast plane:
            ``n`` tumour modes alternating with ``n`` benign ones, each class's modes drawn with frequencies falling
            by ``MODE_FREQUENCY_RATIO`` from one to the next (the CE phases as before: lesions by type, mimics
            isointense). Neighbouring modes belong to the other class, so telling a lesion from a mimic in T2WI +
            DWI takes examples of each mode, and the rare ones are missing from a few labelled volumes, while the
            CE phases keep one cue for all. Shapes and places are those of ``0`` (the modes draw from their own
            stream).

    Returns:
        path of the written ``dataset.json``.
    """
    start = time.time()
    out = Path(out_dir)
    kwargs = dict(size=size, n_slices=n_slices, max_lesions=max_lesions, lesion_radius=tuple(lesion_radius),
                  t2_contrast=t2_contrast, dwi_contrast=dwi_contrast, conspicuity=tuple(conspicuity),
                  ce_contrast=ce_contrast, noise=noise, misregistration=misregistration,
                  cyst_like_fluid=cyst_like_fluid, max_mimics=max_mimics,
                  lesion_types=list(lesion_types), mimic_types=list(mimic_types))
    if appearance_modes:  # recorded only when used (ADDED_ARGUMENTS)
        kwargs["appearance_modes"] = appearance_modes
    records = []
    for i in range(n_cases):
        case = f"liver_{i:03d}"
        data = liver_case(i, seed=seed, **kwargs)
        for name, img in data["images"].items():
            save_nifti(img, data["affine"], out / "imagesTr" / f"{case}_{name}.nii.gz")
        save_nifti(data["label"], data["affine"], out / "labelsTr" / f"{case}.nii.gz")
        save_nifti(data["organs"], data["affine"], out / "organsTr" / f"{case}.nii.gz")
        records.append(_liver_record(case))
    info = {
        "name": "LiverMRIPhantom",
        "description": "Synthetic multi-sequence liver MRI (T2WI, DWI, arterial/portal-venous/delayed CE) with liver "
        "tumour labels; generated by scripts/phantoms.py, not patient data.",
        "tensorImageSize": "4D",
        "modality": {"0": "T2WI", "1": "DWI"},
        "modality_ce": {"0": "arterial", "1": "portal venous", "2": "delayed"},
        "labels": {"0": "background", "1": "tumour"},
        "organs": LIVER_ORGANS,
        "generator": {"seed": seed, **kwargs},
    }
    path = write_dataset_json(out, info, records)
    print(f"liver_mri: {n_cases} cases -> {out} ({time.time() - start:.1f} s)")
    return path


def _liver_record(case: str) -> dict:
    return {
        "case": case,
        "image": [f"imagesTr/{case}_{s}.nii.gz" for s in LIVER_SEQUENCES],
        "ce": [f"imagesTr/{case}_{s}.nii.gz" for s in LIVER_CE_PHASES],
        "label": f"labelsTr/{case}.nii.gz",
        "organs": f"organsTr/{case}.nii.gz",
    }


# ---------------------------------------------------------------------------------------------------------------
# mediastinal CT
# ---------------------------------------------------------------------------------------------------------------


def ct_case(
    index: int,
    seed: int = 0,
    size: int = 96,
    n_slices: int = 64,
    tumour_radius: Sequence[float] = (0.2, 0.3),
    tumour_hu: Sequence[float] = (70.0, 95.0),
    muscle_hu: float = 65.0,
    noise_hu: float = 18.0,
    p_necrosis: float = 0.3,
    p_calcification: float = 0.2,
) -> dict:
    """Generate one mediastinal-CT case in memory (see :func:`mediastinal_ct` for the arguments).

    Returns:
        dict with ``image`` (int16 HU [size, size, n_slices]), ``label`` (uint8 0/1), ``organs`` (uint8),
        ``affine`` (4x4) and ``tumour`` (dict describing the neoplasm).
    """
    rng = case_rng(seed, index, 2)
    shape = (size, size, n_slices)
    grid = normalised_grid(shape)
    x, y, z = grid
    spacing = (rng.uniform(0.6, 1.0),) * 2 + (rng.uniform(1.5, 3.0),)
    affine = ras_affine(spacing, shape, rng, z_origin=rng.uniform(-180.0, -60.0))
    hu = np.full(shape, -1000.0, np.float32)
    organs = np.zeros(shape, np.uint8)

    # chest wall: skin/subcutaneous fat, muscle; ribs as oblique bands in the wall, sternum anteriorly
    body_r = (rng.uniform(0.88, 0.96), rng.uniform(0.64, 0.74), np.inf)
    body_c = (0.0, rng.uniform(-0.04, 0.02), 0.0)
    fat_t, wall_t = rng.uniform(0.04, 0.08), rng.uniform(0.06, 0.09)
    body = ellipse(grid, body_c, body_r) < 1.0
    wall_rho = ellipse(grid, body_c, (body_r[0] - fat_t, body_r[1] - fat_t, np.inf))
    cav_r = (body_r[0] - fat_t - wall_t, body_r[1] - fat_t - wall_t, np.inf)
    cav_rho = ellipse(grid, body_c, cav_r)
    cavity = cav_rho < 1.0
    hu[body] = -100.0
    hu[wall_rho < 1.0] = muscle_hu
    angle = np.arctan2(y - body_c[1], x)
    band = (cav_rho >= 1.0) & (cav_rho < 1.0 + 0.6 * wall_t / cav_r[1])
    rib_phase = (angle / (2 * np.pi) * 3.0 + z * rng.uniform(2.5, 3.5) + rng.uniform()) % (1.0 / 3.0) * 3.0
    ribs = band & (rib_phase < 0.3) & (np.abs(x) > 0.12)
    sternum = ellipse(grid, (0.0, body_c[1] + cav_r[1] + 0.02, 0), (0.09, 0.035, np.inf)) < 1.0
    hu[ribs] = 600.0
    hu[sternum] = 350.0

    # spine and paraspinal muscles
    back = body_c[1] - body_r[1] + fat_t
    vb_c = (0.0, back + 0.27, 0.0)
    vb_r = rng.uniform(0.1, 0.12)
    canal_c = (0.0, vb_c[1] - vb_r - 0.05, 0.0)
    for side in (-1, 1):
        hu[ellipse(grid, (side * 0.18, back + 0.12, 0), (0.13, 0.1, np.inf)) < 1.0] = muscle_hu
    vb_rho = ellipse(grid, vb_c, (vb_r, vb_r * 0.95, np.inf))
    arch = (ellipse(grid, canal_c, (0.085, 0.08, np.inf)) < 1.0) | (
        ellipse(grid, (0.0, canal_c[1] - 0.09, 0), (0.025, 0.07, np.inf)) < 1.0)
    hu[vb_rho < 1.0] = 900.0
    hu[vb_rho < 0.8] = 250.0
    hu[arch] = 700.0
    hu[ellipse(grid, canal_c, (0.045, 0.04, np.inf)) < 1.0] = 20.0
    bone = ribs | sternum | (vb_rho < 1.0) | arch
    organs[bone] = 4
    solid = bone.copy()

    # heart (lower slab, left-anterior) with a pericardial fat rim
    heart_rho = blob(grid, (rng.uniform(-0.16, -0.08), rng.uniform(0.08, 0.16), rng.uniform(-0.75, -0.5)),
                     (rng.uniform(0.33, 0.4), rng.uniform(0.26, 0.32), 0.75), rng, 0.08)
    heart = (heart_rho < 1.0) & cavity & ~solid
    pericardial_fat = (heart_rho < 1.12) & cavity & ~solid & ~heart

    # great vessels: ascending aorta, arch, descending aorta, pulmonary trunk and arteries, SVC, arch branches
    asc = (rng.uniform(0.03, 0.09), rng.uniform(0.06, 0.14))
    desc = (-0.12, vb_c[1] + vb_r + 0.04)
    r_ao = rng.uniform(0.075, 0.09)
    z_arch = rng.uniform(0.5, 0.65)
    arch_pts = np.array([[asc[0] + t * (desc[0] - asc[0]), asc[1] + t * (desc[1] - asc[1]),
                          z_arch + 0.15 * np.sin(np.pi * t)] for t in np.linspace(0, 1, 24)], np.float32)
    ascending = (ellipse(grid, (*asc, 0), (r_ao, r_ao, np.inf)) < 1.0) & (z > -0.6) & (z < z_arch)
    descending = (ellipse(grid, (*desc, 0), (r_ao * 0.85, r_ao * 0.85, np.inf)) < 1.0) & (z < z_arch)
    aorta = ascending | descending | tube(grid, arch_pts, r_ao)
    pt_c = (asc[0] - rng.uniform(0.17, 0.21), asc[1] + 0.04)
    z_pa = rng.uniform(0.05, 0.2)
    pulmonary = ((ellipse(grid, (*pt_c, 0), (0.08, 0.08, np.inf)) < 1.0) & (z > -0.55) & (z < z_pa)) | tube(
        grid, polyline((pt_c[0], pt_c[1], z_pa), (0.42, -0.05, z_pa - 0.1), n=16), 0.05) | tube(
        grid, polyline((pt_c[0], pt_c[1], z_pa), (-0.42, -0.02, z_pa - 0.05), n=16), 0.05)
    svc = (ellipse(grid, (asc[0] + 0.15, asc[1] - 0.02, 0), (0.055, 0.05, np.inf)) < 1.0) & (z > -0.4)
    branches = np.zeros(shape, bool)
    for bx, by in ((0.08, 0.04), (-0.02, 0.0), (-0.1, -0.04)):
        branches |= (ellipse(grid, (bx, by, 0), (0.035, 0.035, np.inf)) < 1.0) & (z > z_arch + 0.05)
    vessels = (aorta | pulmonary | svc | branches) & cavity & ~solid
    heart &= ~vessels

    # airway: trachea (wall + air) to the carina, main bronchi; oesophagus behind it
    tr_c = (0.0, rng.uniform(-0.16, -0.1))
    z_car = rng.uniform(0.0, 0.2)
    trachea_rho = ellipse(grid, (*tr_c, 0), (0.075, 0.07, np.inf))
    bronchi_pts = np.concatenate([polyline((tr_c[0], tr_c[1], z_car), (s * 0.32, tr_c[1] + 0.05, z_car - 0.3), n=16)
                                  for s in (1, -1)])
    airway_wall = ((trachea_rho < 1.0) & (z > z_car)) | tube(grid, bronchi_pts, 0.055)
    airway_air = ((trachea_rho < 0.78) & (z > z_car)) | tube(grid, bronchi_pts, 0.038)
    oesophagus = ellipse(grid, (-0.05, tr_c[1] - 0.12, 0), (0.045, 0.04, np.inf)) < 1.0

    # mediastinum: central compartment from sternum to spine (wider inferiorly), plus everything inside it
    med_rx = rng.uniform(0.17, 0.21) + 0.08 * np.clip(-z, 0, 1)  # widening inferiorly
    med_rho = np.sqrt((x / med_rx) ** 2 + ((y - body_c[1]) / (cav_r[1] * 1.08)) ** 2)
    med_rho = med_rho * (1.0 + 0.08 * smooth_noise(rng, shape, (0.1 * size, 0.1 * size, 0.1 * n_slices)))
    mediastinum = ((med_rho < 1.0) | pericardial_fat | heart | vessels | airway_wall) & cavity & ~solid
    lungs = cavity & ~mediastinum & ~solid

    dependent = np.broadcast_to(-860.0 + 50.0 * np.clip(-y, 0, 1), shape)  # denser posterior (dependent) lung
    hu[lungs] = dependent[lungs]
    lung_sigma = (0.035 * size, 0.035 * size, 0.035 * n_slices)
    f1, f2 = smooth_noise(rng, shape, lung_sigma), smooth_noise(rng, shape, lung_sigma)
    hilar = 1.0 - 0.8 * np.clip(np.abs(x) - 0.2, 0, 1)  # thicker vessels near the hila
    lung_vessels = lungs & (np.abs(f1) < 0.13 * hilar) & (np.abs(f2) < 0.8)
    hu[lung_vessels] = 40.0
    hu[mediastinum] = -95.0
    hu[heart] = 40.0
    hu[heart & (heart_rho < 0.6)] = 35.0
    hu[oesophagus & mediastinum] = 40.0
    hu[vessels] = 42.0
    hu[airway_wall] = 30.0
    hu[airway_air] = -1000.0

    # neoplasm in the anterior (prevascular) or middle mediastinum, abutting heart / vessels
    forbidden = heart | vessels | airway_wall | oesophagus | solid
    # a bulky mass may displace the lung a little beyond the mediastinal contour
    bulge = max(1, int(round(0.06 * size)))
    allowed = ndimage.binary_dilation(mediastinum, np.ones((3, 3, 1), bool), iterations=bulge) & cavity & ~forbidden
    neighbours = ndimage.binary_dilation(heart | vessels, np.ones((3, 3, 3), bool), iterations=2)
    tumour, info = _place_neoplasm(grid, rng, allowed, mediastinum & ~forbidden, neighbours, tumour_radius)
    rho = info.pop("rho")
    info["hu"] = _uniform(rng, tumour_hu)
    texture = smooth_noise(rng, shape, (1.5, 1.5, 1.0))
    hu[tumour] = info["hu"] + 8.0 * texture[tumour]
    if rng.random() < p_necrosis:
        core = tumour & (rho < 0.5)
        hu[core] = rng.uniform(5.0, 20.0) + 5.0 * texture[core]
        info["necrosis"] = bool(core.any())
    if rng.random() < p_calcification:
        voxels = np.argwhere(tumour)
        for v in voxels[rng.integers(len(voxels), size=rng.integers(2, 7))]:
            hu[tuple(v)] = rng.uniform(250.0, 700.0)
        info["calcification"] = True

    organs[lungs & ~tumour] = 1
    organs[heart] = 2
    organs[vessels] = 3
    organs[airway_wall] = 5
    organs[(mediastinum & ~(heart | vessels | airway_wall)) | tumour] = 6

    # scanner: point-spread blur, slightly correlated Gaussian noise, int16 HU
    hu = ndimage.gaussian_filter(hu, (0.7, 0.7, 0.5))
    corr = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (0.6, 0.6, 0.3))
    hu += noise_hu * corr / max(float(corr.std()), 1e-6)
    image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return {"image": image, "label": tumour.astype(np.uint8), "organs": organs, "affine": affine, "tumour": info}


def _place_neoplasm(
    grid: Grid,
    rng: np.random.Generator,
    allowed: np.ndarray,
    seeds: np.ndarray,
    neighbours: np.ndarray,
    radius_range: Sequence[float],
) -> tuple[np.ndarray, dict]:
    """Draw an irregular neoplasm inside ``allowed`` centred in ``seeds`` that touches ``neighbours``.

    Up to 20 draws; the first whose largest connected piece touches the neighbours (heart / great vessels) and
    keeps at least 40 % of the nominal blob volume is returned, otherwise the largest piece drawn.

    Returns:
        boolean mask and a dict (``site``, ``radius`` and ``rho``, the blob's normalised radius).
    """
    x, y, z = grid
    shape = allowed.shape
    best: tuple[np.ndarray, dict] | None = None
    for _ in range(20):
        site = "anterior" if rng.random() < 0.6 else "middle"
        if site == "anterior":  # prevascular, behind the sternum
            window = (y > 0.1) & (np.abs(x) < 0.3) & (z > -0.5) & (z < 0.6)
        else:  # paratracheal / subcarinal, around the tracheal bifurcation
            window = (y > -0.2) & (y < 0.15) & (np.abs(x) < 0.3) & (z > -0.4) & (z < 0.5)
        candidates = np.argwhere(seeds & neighbours & window)
        if len(candidates) == 0:
            continue
        c = candidates[rng.integers(len(candidates))]
        centre = [float(grid[a].reshape(-1)[c[a]]) for a in range(3)]
        r = _uniform(rng, radius_range)
        radii = (r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2), r * rng.uniform(1.0, 1.8))
        rho = blob(grid, centre, radii, rng, roughness=rng.uniform(0.15, 0.35))
        mask = ndimage.binary_opening((rho < 1.0) & allowed, np.ones((3, 3, 1), bool))
        labels, n = ndimage.label(mask)
        if n == 0:
            continue
        mask = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)  # largest connected piece
        info = {"site": site, "radius": r, "rho": rho}
        nominal = 4.0 / 3.0 * np.pi * np.prod([ra * n_ / 2.0 for ra, n_ in zip(radii, shape)])
        if (mask & neighbours).any() and mask.sum() >= 0.4 * nominal:
            return mask, info
        if best is None or mask.sum() > best[0].sum():
            best = (mask, info)
    if best is None:
        raise RuntimeError("could not place a neoplasm; the field of view is too small")
    return best


def mediastinal_ct(
    out_dir: str,
    n_cases: int = 24,
    seed: int = 0,
    size: int = 96,
    n_slices: int = 64,
    tumour_radius: Sequence[float] = (0.2, 0.3),
    tumour_hu: Sequence[float] = (70.0, 95.0),
    muscle_hu: float = 65.0,
    noise_hu: float = 18.0,
    p_necrosis: float = 0.3,
    p_calcification: float = 0.2,
) -> str:
    """Write a non-contrast mediastinal-CT phantom dataset (HU, int16) with one neoplasm per case.

    Each case is a scaled-down thorax: skin / subcutaneous fat, chest-wall muscle, ribs, sternum, spine with
    paraspinal muscles, lungs (~-850 HU, denser posteriorly, with vessels), mediastinal fat (~-95 HU), heart
    (~35-40 HU) with pericardial fat, aorta (ascending, arch, descending), pulmonary trunk and arteries, SVC,
    arch branches (~42 HU, no contrast), trachea and main bronchi (air), oesophagus and one irregular neoplasm
    in the anterior (prevascular) or middle mediastinum, always touching the heart or a great vessel. The
    neoplasm's density (``tumour_hu``, with texture, optionally a necrotic core or calcified specks) stands
    out from the heart and vessels it touches but overlaps the chest-wall muscle and soft-tissue partial volumes,
    so an intensity threshold cannot segment it: the best single threshold or HU window reaches a Dice below 0.5
    (tests/test_phantoms.py). Images are blurred
    (point-spread) and carry slightly correlated Gaussian noise. Spacing: in-plane U(0.6, 1.0) mm, slices
    U(1.5, 3.0) mm.

    Organ labels: 0 background / body wall, 1 lung, 2 heart, 3 great vessels, 4 bone, 5 airway,
    6 mediastinum (fat, oesophagus and the neoplasm).

    Args:
        out_dir: output folder (created).
        n_cases: number of cases ``ct_000`` ...
        seed: dataset seed; case ``i`` depends only on ``(seed, i)``.
        size: in-plane matrix (size x size).
        n_slices: number of slices (z, last array axis).
        tumour_radius: range of neoplasm radii as a fraction of the half field of view. The default, 0.2-0.3 of
            about 38 mm, gives radii of about 7.5-11.5 mm: 5-7.5 voxels in-plane at the 1.5 mm of the ``cpu``
            benchmark profile.
        tumour_hu: range of the neoplasm's mean density in HU. The default, 70-95 HU, is 30-60 HU above the heart
            and great vessels it touches, so a network learns its boundary from the local contrast in a short CPU
            run; it overlaps the chest-wall and paraspinal muscle (``muscle_hu``) within the noise, so no
            threshold or window finds it.
        muscle_hu: density of the chest-wall and paraspinal muscle (65 HU, the upper end of skeletal muscle: the
            confounder of the neoplasm's density).
        noise_hu: standard deviation of the image noise in HU.
        p_necrosis: probability of a necrotic (5-20 HU) core.
        p_calcification: probability of calcified specks (250-700 HU).

    Returns:
        path of the written ``dataset.json``.
    """
    start = time.time()
    out = Path(out_dir)
    kwargs = dict(size=size, n_slices=n_slices, tumour_radius=tuple(tumour_radius), tumour_hu=tuple(tumour_hu),
                  muscle_hu=muscle_hu, noise_hu=noise_hu, p_necrosis=p_necrosis, p_calcification=p_calcification)
    records = []
    for i in range(n_cases):
        case = f"ct_{i:03d}"
        data = ct_case(i, seed=seed, **kwargs)
        save_nifti(data["image"], data["affine"], out / "imagesTr" / f"{case}.nii.gz")
        save_nifti(data["label"], data["affine"], out / "labelsTr" / f"{case}.nii.gz")
        save_nifti(data["organs"], data["affine"], out / "organsTr" / f"{case}.nii.gz")
        records.append({"case": case, "image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz",
                        "organs": f"organsTr/{case}.nii.gz"})
    info = {
        "name": "MediastinalCTPhantom",
        "description": "Synthetic non-contrast thoracic CT (HU) with mediastinal neoplasm labels; generated by "
        "scripts/phantoms.py, not patient data.",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "neoplasm"},
        "organs": CT_ORGANS,
        "generator": {"seed": seed, **kwargs},
    }
    path = write_dataset_json(out, info, records)
    print(f"mediastinal_ct: {n_cases} cases -> {out} ({time.time() - start:.1f} s)")
    return path


# ---------------------------------------------------------------------------------------------------------------
# data lists
# ---------------------------------------------------------------------------------------------------------------


def datalist(
    data_dir: str, label_ratio: float = 1.0, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> str:
    """Write ``data_dir/datalist_<pct>.json``: an MSD-style split of ``dataset.json`` for semi-supervised training.

    One permutation of the cases, fixed by ``seed``, gives the test cases (first ``round(test_fraction * n)``),
    then the validation cases (next ``round(val_fraction * n)``), both at least one case and identical for every
    ``label_ratio``; of the remaining pool, the first ``max(1, round(label_ratio * len(pool)))`` are labelled
    (``"training"``), so labelled subsets are nested across ratios, and the rest are ``"unlabeled"`` records
    without ``"label"`` and ``"organs"``. Paths stay relative to ``data_dir``.

    Args:
        data_dir: folder holding ``dataset.json`` (written by :func:`liver_mri` or :func:`mediastinal_ct`).
        label_ratio: fraction of the training pool with labels, in (0, 1].
        seed: split seed.
        val_fraction: fraction of all cases used for validation.
        test_fraction: fraction of all cases held out for testing.

    Returns:
        path of the written data list.
    """
    if not 0.0 < label_ratio <= 1.0:
        raise ValueError(f"label_ratio must be in (0, 1], got {label_ratio}")
    folder = Path(data_dir)
    records = sorted(json.loads((folder / "dataset.json").read_text())["training"], key=lambda r: r["case"])
    n = len(records)
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 7919])).permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    n_val = max(1, int(round(val_fraction * n)))
    pool = [records[i] for i in order[n_test + n_val:]]
    if not pool:
        raise ValueError(f"{n} cases are too few for a test, a validation and a training split")
    n_labelled = max(1, int(round(label_ratio * len(pool))))
    split = {
        "training": pool[:n_labelled],
        "unlabeled": [{k: v for k, v in r.items() if k not in ("label", "organs")} for r in pool[n_labelled:]],
        "validation": [records[i] for i in order[n_test:n_test + n_val]],
        "test": [records[i] for i in order[:n_test]],
    }
    path = folder / f"datalist_{int(round(100 * label_ratio))}.json"
    path.write_text(json.dumps(split, indent=2) + "\n")
    print(f"datalist: {n_labelled} labelled, {len(pool) - n_labelled} unlabeled, {n_val} validation, "
          f"{n_test} test -> {path}")
    return str(path)


def appearance_modes_by_split(datalist_path: str) -> dict[str, dict[str, dict[str, int]]]:
    """How many lesions and mimics of each appearance mode each split of a liver datalist holds (``liver_mri`` with
    ``appearance_modes``), the cases regenerated from the ``generator`` entry of the ``dataset.json`` next to it.

    Args:
        datalist_path: a ``datalist_<pct>.json`` written by :func:`datalist`.

    Returns:
        ``{split: {"lesions": {mode: count}, "mimics": {mode: count}}}``, modes as strings, a cyst with
        ``cyst_like_fluid`` counted as ``"fluid"``; also printed, one line per split.
    """
    path = Path(datalist_path)
    generator = dict(json.loads((path.parent / "dataset.json").read_text())["generator"])
    seed = generator.pop("seed")
    out = {}
    for split, records in json.loads(path.read_text()).items():
        counts: dict[str, dict[str, int]] = {"lesions": {}, "mimics": {}}
        for record in records:
            case = liver_case(int(str(record["case"]).rsplit("_", 1)[1]), seed=seed, **generator)
            for kind, modes in (("lesions", case["lesion_modes"]), ("mimics", case["mimic_modes"])):
                for mode in modes:
                    key = "fluid" if mode is None else str(mode)
                    counts[kind][key] = counts[kind].get(key, 0) + 1
        out[split] = {k: dict(sorted(v.items())) for k, v in counts.items()}
        print(f"{split} ({len(records)} volumes): lesions {out[split]['lesions']}, mimics {out[split]['mimics']}")
    return out


if __name__ == "__main__":
    fire.Fire({"liver_mri": liver_mri, "mediastinal_ct": mediastinal_ct, "datalist": datalist,
               "appearance_modes_by_split": appearance_modes_by_split})
