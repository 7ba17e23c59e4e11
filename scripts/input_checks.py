"""Validation of NIfTI and DICOM-series inputs, labels and case lists before any compute is spent on them.

Every problem raises :class:`InputError`, which names the offending file and the problem in one line. The checks run
in two stages so that nothing big is read before the cheap checks pass:

1. header level (:func:`check_header`): the file exists and its NIfTI header can be read, the image is 3D (or 4D with
   the expected number of channels), the voxel spacing is finite and positive and the affine is finite and
   invertible. Only the header (a few hundred bytes) is read, whatever the image size.
2. voxel level (:func:`scan_voxels`): the voxel data are streamed from the file once, a slab of slices at a time
   (the NIfTI data are stored slice after slice along the last spatial axis), so that a truncated or corrupt file,
   NaN/Inf voxels or an all-constant image are found with memory bounded by one slab, not by the volume; the same
   pass tells whether the intensities look like the model's modality (:func:`check_modality`, with the bundle's own
   rule, ``scripts/modality.py``, which its inference preprocessing applies too: CT in HU has air).

An image may also be a folder holding one DICOM series (one folder per sequence of a multi-modal model): its header
level is the bundle's own check of the series (``scripts/dicom_series.py``: one series, the model's modality, every
slice present, even spacing; :func:`series_header`), its voxel level a pass over the slices, one file at a time
(:func:`scan_series`).

:func:`check_case` combines them for one case (several modalities that must belong together, an optional label
that must match the image and hold only 0/1); :func:`load_cases` reads a folder, a CSV file or a datalist JSON and
rejects empty lists and duplicate case ids.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import nibabel as nib
import numpy as np

__all__ = [
    "InputError",
    "HeaderInfo",
    "VoxelStats",
    "check_header",
    "scan_voxels",
    "series_header",
    "scan_series",
    "check_image",
    "check_label",
    "check_modalities",
    "check_modality",
    "check_case",
    "load_cases",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")

CaseName = Callable[[str | Sequence[str], Sequence[str]], str]
"""A bundle's case-naming rule, ``case_name(image, modality_suffixes) -> case id`` (``scripts/case_meta.py``)."""

ModalityRule = ModuleType
"""A bundle's ``scripts/modality.py`` (loaded by path): ``AIR_HU`` and ``modality_problem(modality, air_fraction,
minimum, maximum) -> problem or None``."""


SeriesRule = ModuleType
"""A bundle's ``scripts/dicom_series.py`` (loaded by path): ``check_series(folder, modality) -> info`` and
``DicomSeriesError`` (``source``, ``problem``)."""


class InputError(ValueError):
    """An input that cannot be processed.

    Args:
        path: the offending file (or list/folder).
        problem: what is wrong with it, in words.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class HeaderInfo:
    """What the header says about an image: ``shape`` (3 spatial dims, then channels if any), ``spacing`` (mm, 3),
    ``affine`` (4x4 voxel-to-world) and ``channels`` (1 for a 3D image)."""

    path: str
    shape: tuple[int, ...]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    channels: int

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape[:3])  # type: ignore[return-value]

    def field_of_view(self) -> tuple[np.ndarray, np.ndarray]:
        """World-space centre and extent (mm, per world axis) of the box spanned by the voxel centres."""
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in self.spatial_shape], indexing="ij")).reshape(3, -1)
        world = self.affine[:3, :3] @ corners + self.affine[:3, 3:4]
        low, high = world.min(axis=1), world.max(axis=1)
        return (low + high) / 2, high - low


@dataclass(frozen=True)
class VoxelStats:
    """Summary of one streamed pass over the voxels: minimum, maximum and the set of values when few."""

    minimum: float
    maximum: float
    values: frozenset | None
    """The distinct values (as read from disk, after scaling) when there are at most 16 of them, else ``None``."""
    air_fraction: float = 0.0
    """The fraction of voxels below ``air_below`` of :func:`scan_voxels` (after scaling): air in a CT in HU."""


def _is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def _raw_header(path: str, header_class: type) -> nib.Nifti1Header:
    """The header as stored: ``nib.load`` silently replaces a zero or negative ``pixdim`` by a plausible one."""
    with nib.openers.ImageOpener(path, "rb") as f:
        return header_class.from_fileobj(f, check=False)


def check_header(path: str | os.PathLike, channels: int | None = None) -> HeaderInfo:
    """Header-level checks of a NIfTI image (reads the header only).

    Args:
        path: the ``.nii``/``.nii.gz`` file.
        channels: the number of channels a 4D image must have (a 3D image counts as one channel); ``None``
            accepts 3D images only.

    Returns:
        the :class:`HeaderInfo`.

    Raises:
        InputError: missing file, unreadable or corrupt header, not 3D (or 4D with ``channels`` channels), zero,
            negative or non-finite spacing, non-finite or singular affine, or (uncompressed) a file shorter than
            its header says.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    if not os.path.isfile(path):
        raise InputError(path, "not a file")
    if not _is_nifti(path):
        raise InputError(path, f"not a NIfTI file (expected one of {', '.join(NIFTI_SUFFIXES)})")
    try:
        image = nib.load(path)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError, ValueError) as e:
        raise InputError(path, f"corrupt or unreadable NIfTI header ({type(e).__name__}: {e})") from e
    header = image.header
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 3:
        n_channels = 1
    elif len(shape) == 4 and channels is not None and channels > 1:
        n_channels = shape[3]
    else:
        raise InputError(path, f"expected a 3D image, got {len(shape)}D with shape {shape}")
    if channels is not None and n_channels not in (1, channels):
        raise InputError(path, f"expected {channels} channels (or a 3D image per modality), got shape {shape}")
    if min(shape[:3]) < 1:
        raise InputError(path, f"empty image, shape {shape}")
    pixdim = np.asarray(_raw_header(path, type(header))["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise InputError(path, f"voxel spacing must be finite and positive, header pixdim is {pixdim.tolist()}")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "the affine holds NaN or Inf")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, f"the affine is singular (voxel spacing {spacing.tolist()})")
    if not path.lower().endswith(".gz"):
        needed = int(image.dataobj.offset) + int(np.prod(shape)) * header.get_data_dtype().itemsize
        if os.path.getsize(path) < needed:
            raise InputError(path, f"truncated: {os.path.getsize(path)} bytes on disk, the header needs {needed}")
    return HeaderInfo(path, shape, tuple(float(s) for s in spacing), affine, n_channels)  # type: ignore[arg-type]


def scan_voxels(path: str | os.PathLike, max_slab_bytes: int = 16 * 2**20, air_below: float = -np.inf) -> VoxelStats:
    """Stream the voxel data once, a slab of slices at a time, and check it is complete and finite.

    Memory is bounded by ``max_slab_bytes`` (plus one slice), whatever the image size; the whole volume is never
    held in memory. A ``.nii.gz`` is read to the end of its stream, so that its CRC is verified.

    Args:
        path: a file that passed :func:`check_header`.
        max_slab_bytes: the most bytes read at a time.
        air_below: the (scaled) intensity below which a voxel counts towards ``air_fraction`` (a bundle's
            ``AIR_HU``).

    Returns:
        :class:`VoxelStats` of the (scaled) voxel values.

    Raises:
        InputError: the data are truncated or the compressed stream is corrupt, or voxels are NaN/Inf.
    """
    path = os.fspath(path)
    image = nib.load(path)
    proxy = image.dataobj
    dtype = image.header.get_data_dtype()
    shape = tuple(int(n) for n in image.shape)
    slice_bytes = int(np.prod(shape[:2])) * dtype.itemsize
    n_slices = int(np.prod(shape[2:]))  # slices along z (and channels) are contiguous in Fortran order
    per_slab = max(1, max_slab_bytes // max(slice_bytes, 1))
    slope = 1.0 if proxy.slope is None or np.isnan(proxy.slope) else float(proxy.slope)
    inter = 0.0 if proxy.inter is None or np.isnan(proxy.inter) else float(proxy.inter)
    if not np.isfinite(slope) or not np.isfinite(inter):
        raise InputError(path, f"non-finite intensity scaling (scl_slope {slope}, scl_inter {inter})")
    low, high, values, air = np.inf, -np.inf, set(), 0
    raw_air = (air_below - inter) / slope if slope != 0 else np.inf  # before scaling: no scaled copy of a slab
    try:
        with nib.openers.ImageOpener(path, "rb") as stream:
            stream.seek(int(proxy.offset))
            for start in range(0, n_slices, per_slab):
                count = min(per_slab, n_slices - start)
                raw = stream.read(count * slice_bytes)
                if len(raw) < count * slice_bytes:
                    raise InputError(path, f"truncated: the voxel data end in slice {start + len(raw) // slice_bytes}"
                                           f" of {n_slices}")
                slab = np.frombuffer(raw, dtype=dtype)
                if slab.dtype.kind in "fc":
                    bad = ~np.isfinite(slab)
                    if bad.any():
                        kind = "NaN" if np.isnan(slab[bad]).any() else "Inf"
                        where = f"slices {start}-{start + count - 1}"
                        raise InputError(path, f"{int(bad.sum())} {kind} voxel(s) in {where}")
                low, high = min(low, float(slab.min())), max(high, float(slab.max()))
                air += int(np.count_nonzero(slab < raw_air if slope > 0 else slab > raw_air))
                if values is not None:
                    distinct = np.unique(slab)
                    values = None if len(distinct) > 16 else values | set(distinct.tolist())
                    if values is not None and len(values) > 16:
                        values = None
            while stream.read(2**20):  # read a compressed stream to its end: its CRC is checked there
                pass
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(path, f"corrupt or truncated compressed data ({type(e).__name__}: {e})") from e
    ends = sorted((low * slope + inter, high * slope + inter))
    scaled = None if values is None else frozenset(v * slope + inter for v in values)
    return VoxelStats(ends[0], ends[1], scaled, air / max(int(np.prod(shape)), 1))


def series_header(folder: str | os.PathLike, series: SeriesRule, modality: str | None = None) -> HeaderInfo:
    """Header-level checks of a DICOM series folder by the bundle's own rule (reads the slice headers only).

    Args:
        folder: the series folder.
        series: the bundle's ``scripts/dicom_series.py``.
        modality: the DICOM ``Modality`` the model expects (``None``: not checked).

    Returns:
        the :class:`HeaderInfo` of the volume a reader stacks: shape ``(columns, rows, slices)``, spacing, and the
        RAS affine (voxel ``(i, j, k)`` is column ``i``, row ``j`` of the ``k``-th slice by instance number).

    Raises:
        InputError: the rule's problem, naming the folder and the series.
    """
    try:
        info = series.check_series(folder, modality)
    except series.DicomSeriesError as e:
        raise InputError(e.source, e.problem) from None
    orientation, positions = np.asarray(info["orientation"]), np.asarray(info["positions"])
    between_rows, between_columns = info["pixel_spacing"]
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = orientation[:3] * between_columns, orientation[3:] * between_rows
    lps[:3, 2], lps[:3, 3] = step, positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    shape = (info["size"][1], info["size"][0], info["slices"])
    return HeaderInfo(os.fspath(folder), shape, (between_columns, between_rows, float(np.linalg.norm(step))), affine, 1)


def scan_series(files: Sequence[str], air_below: float = -np.inf) -> VoxelStats:
    """One pass over the pixel data of a series, one slice file at a time (after ``RescaleSlope`` /
    ``RescaleIntercept``): the same summary as :func:`scan_voxels`.

    Raises:
        InputError: a slice whose pixel data cannot be decoded, naming the file.
    """
    import pydicom
    from pydicom.pixels import apply_rescale

    low, high, below, count, values = np.inf, -np.inf, 0, 0, set()
    for file in files:
        try:
            ds = pydicom.dcmread(file)
            data = np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float64)
        except Exception as e:  # noqa: BLE001 - any decoding failure is the file's problem
            raise InputError(file, f"pixel data cannot be read ({type(e).__name__}: {e})") from None
        low, high = min(low, float(data.min())), max(high, float(data.max()))
        below += int((data < air_below).sum())
        count += data.size
        if values is not None:
            values.update(np.unique(data).tolist())
            values = values if len(values) <= 16 else None
    return VoxelStats(low, high, frozenset(values) if values is not None else None, below / max(count, 1))


def check_modality(path: str | os.PathLike, stats: VoxelStats, modality: str, rule: ModalityRule) -> None:
    """Whether the intensities look like the modality the model was trained on (``metadata.json``), by the bundle's
    own rule (its ``scripts/modality.py``, which its inference preprocessing applies as well).

    Args:
        path: the file (for the message).
        stats: its :func:`scan_voxels` summary, with ``air_below=rule.AIR_HU``.
        modality: ``"CT"`` or ``"MR"`` (other modalities are not checked).
        rule: the bundle's ``scripts/modality.py``.

    Raises:
        InputError: the rule's problem (a CT without air, an MR with a CT's share of it).
    """
    problem = rule.modality_problem(modality, stats.air_fraction, stats.minimum, stats.maximum)
    if problem is not None:
        raise InputError(path, problem)


def check_image(path: str | os.PathLike, channels: int | None = None, scan: bool = True,
                modality: str | None = None, rule: ModalityRule | None = None) -> HeaderInfo:
    """Header checks, then (``scan``) the streamed voxel checks including "not all constant" and, given a
    ``modality`` and the bundle's ``rule``, :func:`check_modality`."""
    info = check_header(path, channels)
    if scan:
        stats = scan_voxels(path, air_below=rule.AIR_HU if rule is not None else -np.inf)
        if stats.minimum == stats.maximum:
            raise InputError(path, f"all voxels have the same value ({stats.minimum:g}); nothing to segment")
        if modality and rule is not None:
            check_modality(path, stats, modality, rule)
    return info


def check_label(path: str | os.PathLike, image: HeaderInfo, atol: float = 1e-3, scan: bool = True) -> HeaderInfo:
    """A binary label: 3D, the image's spatial shape and affine (to ``atol``), and (``scan``) values in {0, 1}."""
    info = check_header(path)
    if info.spatial_shape != image.spatial_shape:
        raise InputError(path, f"label shape {info.spatial_shape} differs from image shape {image.spatial_shape}"
                               f" ({image.path})")
    if not np.allclose(info.affine, image.affine, atol=atol):
        raise InputError(path, f"label affine differs from the image affine ({image.path}):\n"
                               f"{np.round(info.affine, 3)}\nvs\n{np.round(image.affine, 3)}")
    if not scan:
        return info
    stats = scan_voxels(path)
    if stats.values is None or not stats.values <= {0, 1}:
        shown = sorted(stats.values)[:8] if stats.values is not None else f"more than 16 values, {stats.minimum:g}"\
            f"..{stats.maximum:g}"
        raise InputError(path, f"label values must be 0 or 1, found {shown}")
    return info


def check_modalities(infos: Sequence[HeaderInfo], max_centre_shift_mm: float = 30.0, max_extent_ratio: float = 1.25):
    """Modalities stacked as channels must share the voxel grid's shape and cover the same field of view.

    Args:
        infos: header info of each modality, the first is the reference.
        max_centre_shift_mm: the most the centres of the fields of view may differ.
        max_extent_ratio: the most an extent (per world axis) may differ, as a ratio.

    Raises:
        InputError: naming the modality that does not belong with the first.
    """
    ref = infos[0]
    ref_centre, ref_extent = ref.field_of_view()
    for info in infos[1:]:
        if info.spatial_shape != ref.spatial_shape:
            raise InputError(info.path, f"shape {info.spatial_shape} differs from {ref.spatial_shape} of {ref.path};"
                                        " modalities are stacked as channels and must share the voxel grid")
        centre, extent = info.field_of_view()
        shift = float(np.linalg.norm(centre - ref_centre))
        ratio = np.maximum(extent, 1.0) / np.maximum(ref_extent, 1.0)
        if shift > max_centre_shift_mm or np.any(ratio > max_extent_ratio) or np.any(ratio < 1 / max_extent_ratio):
            def fov(c, e):
                return f"centre {np.round(c, 1).tolist()} mm, extent {np.round(e, 1).tolist()} mm"

            raise InputError(info.path, f"field of view ({fov(centre, extent)}) does not match {ref.path} "
                                        f"({fov(ref_centre, ref_extent)}); these images cannot belong to the same case")


def _check_series_image(folder: str, series: SeriesRule | None, scan: bool, modality: str | None,
                        rule: ModalityRule | None) -> HeaderInfo:
    """:func:`series_header`, then (``scan``) :func:`scan_series` with the constant and modality checks."""
    if series is None:
        raise InputError(folder, "is a folder; a DICOM series folder needs the bundle's scripts/dicom_series.py")
    info = series_header(folder, series, modality)
    if scan:
        files = series.check_series(folder)["files"]
        stats = scan_series(files, air_below=rule.AIR_HU if rule is not None else -np.inf)
        if stats.minimum == stats.maximum:
            raise InputError(folder, f"all voxels have the same value ({stats.minimum:g}); nothing to segment")
        if modality and rule is not None:
            check_modality(folder, stats, modality, rule)
    return info


def check_case(record: dict, modalities: int = 1, scan: bool = True, modality: str | None = None,
               rule: ModalityRule | None = None, series: SeriesRule | None = None) -> list[HeaderInfo]:
    """Check one case record ``{"image": path or [paths], "label": path (optional)}``.

    Args:
        record: the case; ``image`` is one file (3D, or 4D with ``modalities`` channels), ``modalities`` 3D files,
            or DICOM series folders in place of 3D files.
        modalities: the number of input channels the network expects.
        scan: also stream the voxels (NaN/Inf, all-constant, truncation, label values, and the ``modality``).
        modality: the model's input modality (``"CT"``, ``"MR"``), checked by :func:`check_modality` with ``rule``
            (and, for a series, against its DICOM ``Modality``).
        rule: the bundle's ``scripts/modality.py``.
        series: the bundle's ``scripts/dicom_series.py`` (needed for series folders).

    Returns:
        header info of each image file or series.
    """
    images = record.get("image")
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if not images:
        raise InputError(str(record.get("case", "<record>")), "the record has no 'image'")
    images = [os.fspath(p) for p in images]
    if len(images) not in (1, modalities):
        raise InputError(images[0], f"{len(images)} image files given, the model expects {modalities} modalities")
    folders = [p for p in images if os.path.isdir(p)]
    if folders:
        if len(images) != modalities:
            raise InputError(folders[0], f"a DICOM series is one channel: give {modalities} series folders, one per "
                                         "modality")
        infos = [_check_series_image(p, series, scan, modality, rule) if p in folders else
                 check_image(p, scan=scan, modality=modality, rule=rule) for p in images]
        check_modalities(infos)
    elif len(images) == 1 and modalities > 1:
        info = check_header(images[0], channels=modalities)
        if info.channels != modalities:
            raise InputError(images[0], f"a single file must be 4D with {modalities} channels, got shape {info.shape}")
        infos = [info]
    else:
        infos = [check_header(p) for p in images]
        check_modalities(infos)
    if scan and not folders:
        for p in images:
            check_image(p, channels=modalities if len(images) == 1 else None, modality=modality, rule=rule)
    if record.get("label"):
        check_label(record["label"], infos[0], scan=scan)
    return infos


def _resolve(base: str, value):
    if isinstance(value, (list, tuple)):
        return [os.path.normpath(os.path.join(base, os.fspath(v))) for v in value]
    return os.path.normpath(os.path.join(base, os.fspath(value)))


def _holds_dicom(folder: str) -> bool:
    """Whether ``folder`` directly holds a DICOM file (the ``DICM`` marker after the 128-byte preamble)."""
    for entry in os.scandir(folder):
        if entry.is_file():
            with open(entry.path, "rb") as f:
                if f.read(132)[128:] == b"DICM":
                    return True
    return False


def _from_folder(folder: str, case_name: CaseName, modality_suffixes: Sequence[str]) -> list[dict]:
    """NIfTI files and DICOM series sub-folders of ``folder``, as records (a multi-modal case from the files or
    folders that share a name up to the modality suffixes)."""
    files = sorted(f for f in os.listdir(folder) if not f.startswith(".") and (
        _is_nifti(f) and os.path.isfile(os.path.join(folder, f))
        or os.path.isdir(os.path.join(folder, f)) and _holds_dicom(os.path.join(folder, f))))
    if len(modality_suffixes) < 2:
        return [{"image": os.path.join(folder, f)} for f in files]
    first, records, used = modality_suffixes[0], [], set()
    for f in files:
        stem = case_name(f, ())
        if stem.endswith(first) and len(stem) > len(first):
            case = stem[: -len(first)]
            ext = f[len(stem):]
            paths = [os.path.join(folder, f"{case}{s}{ext}") for s in modality_suffixes]
            records.append({"case": case, "image": paths})
            used.update(os.path.basename(p) for p in paths)
    for f in files:  # one 4D file per case
        if f not in used and not any(case_name(f, ()).endswith(s) for s in modality_suffixes):
            records.append({"image": os.path.join(folder, f)})
    return records


def _from_csv(path: str) -> list[dict]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise InputError(path, f"a case CSV needs an 'image' column, found columns {reader.fieldnames}")
        records = []
        for row in reader:
            record = {k: v.strip() for k, v in row.items() if k and v and v.strip()}
            if "image" not in record:
                raise InputError(path, f"row {reader.line_num} has no image")
            images = [p.strip() for p in record["image"].split(";") if p.strip()]
            record["image"] = _resolve(base, images if len(images) > 1 else images[0])
            if "label" in record:
                record["label"] = _resolve(base, record["label"])
            records.append(record)
    return records


def _from_datalist(path: str, split: str) -> list[dict]:
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON ({e})") from e
    if isinstance(content, dict):
        if split not in content:
            raise InputError(path, f"the datalist has no '{split}' list (keys: {sorted(content)})")
        content = content[split]
    if not isinstance(content, list):
        raise InputError(path, f"the '{split}' entry must be a list of records")
    records = []
    for i, item in enumerate(content):
        record = {"image": item} if isinstance(item, (str, list)) else dict(item) if isinstance(item, dict) else None
        if record is None or not record.get("image"):
            raise InputError(path, f"record {i} of '{split}' has no 'image': {item!r}")
        record["image"] = _resolve(base, record["image"])
        if record.get("label"):
            record["label"] = _resolve(base, record["label"])
        records.append(record)
    return records


def load_cases(inputs: str | os.PathLike, case_name: CaseName, split: str = "test",
               modality_suffixes: Sequence[str] = ()) -> list[dict]:
    """The cases to process, each ``{"case": id, "image": path or [paths], "label": path (optional), ...}``.

    Args:
        inputs: a folder of NIfTI files and / or DICOM series folders, a CSV file (column ``image``, several files
            separated by ``;``, optional ``case`` and ``label``; paths relative to the CSV's folder) or a datalist JSON
            (a list of records or a dict of splits; paths relative to its folder).
        case_name: the bundle's case-naming rule, ``case_name(image, modality_suffixes) -> id`` (its
            ``scripts/case_meta.py``), for records without a ``case``.
        split: the split of a datalist dict to read.
        modality_suffixes: for a folder of a multi-modal model, the file name suffixes of the modalities in channel
            order (e.g. ``("_t2w", "_dwi")``); files without them are taken as one 4D file per case. Also stripped
            from file names to make case ids.

    Raises:
        InputError: the input is missing or of unknown kind, no case is found, or two cases share an id.
    """
    inputs = os.fspath(inputs)
    if not os.path.exists(inputs):
        raise InputError(inputs, "input folder or list not found")
    if os.path.isdir(inputs):
        records = _from_folder(inputs, case_name, modality_suffixes)
    elif inputs.lower().endswith(".csv"):
        records = _from_csv(inputs)
    elif inputs.lower().endswith(".json"):
        records = _from_datalist(inputs, split)
    else:
        raise InputError(inputs, "expected a folder, a .csv file or a datalist .json")
    if not records:
        raise InputError(inputs, "no cases found (empty folder or case list)")
    seen: dict[str, str] = {}
    for record in records:
        record["case"] = str(record.get("case") or case_name(record["image"], modality_suffixes))
        first = record["image"] if isinstance(record["image"], str) else record["image"][0]
        if record["case"] in seen:
            raise InputError(inputs, f"duplicate case id '{record['case']}' ({seen[record['case']]} and {first})")
        seen[record["case"]] = first
    return records
