"""Batch inference of a bundle's ``inference.json`` over many scans, safe to run unattended.

Usage (from anywhere)::

    python scripts/batch_infer.py --bundle bundles/ceds_mediastinum --inputs <folder|cases.csv|datalist.json> \\
        --out_dir runs/ct [--checkpoint model.pt] [--overlay configs/cpu_demo.json] [--png True] [--qc_threshold T]

For every case it writes ``<out_dir>/<case>/``: the bundle's outputs renamed to ``<case>_<postfix>`` (the mask
``<case>_seg.nii.gz``, ``<case>_uncertainty.nii.gz`` or ``<case>_confidence.nii.gz``, the liver bundle's
``<case>_quantification.json``), optionally ``<case>_overview.png``, and last the completion marker ``done.json``
(outputs, QC, seconds). A case folder only ever appears complete: the bundle writes into a staging folder inside
``out_dir``, the files are gathered in ``<out_dir>/.partial-<case>/`` and that folder is renamed into place
(``os.replace``) once everything is written.

Provenance: ``done.json`` and ``run_summary.json`` record the bundle's name and version, the checkpoint's path and
SHA-256, the overlays and the overrides (:func:`provenance`). A rerun skips a case whose ``done.json`` has the same
provenance and recomputes one made with another checkpoint, bundle version, overlay or override (its row says
what differed), so no output is ever attributed to weights that did not make it.

An image may be a NIfTI file or a folder holding one DICOM series (one per modality): the bundle reads it with MONAI's
``PydicomReader``, after its own check of the series (``scripts/dicom_series.py``), and writes the same outputs.

Each case is validated (:mod:`input_checks`: header first, then a streamed pass over the voxels) before any compute
is spent on it. A case that is invalid or fails during inference is recorded with its reason in
``run_summary.json``/``run_summary.csv`` and the run goes on; the exit code is 1 when any case failed or was
invalid, 2 when the case list itself is unusable (missing, empty, duplicate case ids).

QC: ``needs_review`` is set when the predicted mask is empty or when the mean doubt inside the mask (the bundle's
uncertainty map, or 1 - its confidence map) is above ``qc_threshold``. Each bundle's default threshold is its
``metadata.json`` ``quality_control`` ``doubt_threshold``, chosen on the validation split by
``scripts/qc_threshold.py`` (``null``: only an empty mask needs review).

Cases are named by the bundle's own rule (``scripts/case_meta.py`` of the bundle, loaded by path), and a folder of
a multi-modal bundle is read with the file-name suffixes of its ``metadata.json`` (``channel_file_suffixes``).

The bundle's workflow (network, checkpoint, transforms, inferer) is built once per run with
:class:`monai.bundle.ConfigWorkflow`; each case is run through it by swapping the one record of its dataset. After a
case fails inside the workflow, it is built afresh for the next case (an ignite engine that raised does not run
cleanly again).
Several processes, on one machine or several (``torchrun``; the script itself is unchanged)::

    torchrun --nnodes=1 --nproc_per_node=4 scripts/batch_infer.py --bundle ... --inputs ... --out_dir ...

Each process (rank ``r`` of ``w``, from ``RANK`` / ``WORLD_SIZE``) takes the cases ``r, r + w, r + 2w, ...`` of the
case list (:class:`Shard`) and stages its outputs in its own folder; the per-case folders, markers and reruns work as
in one process. When every rank has finished its share, the ranks exchange their rows (``torch.distributed``, gloo)
and rank 0 writes one ``run_summary.json`` / ``.csv`` that lists every case once, in the case list's order, with
the ``rank`` and ``host`` that ran it; each rank returns (and exits with the code of) the whole run. Across nodes,
``out_dir`` should be a shared filesystem (each node otherwise holds the case folders of its own ranks). With CUDA and
no ``--device``, rank ``r`` uses ``cuda:<LOCAL_RANK>``.

Bundle configs execute code (``$`` expressions, ``_target_`` imports): run only bundles from a trusted source.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import fire
import nibabel as nib
import numpy as np
from tqdm import tqdm

from bundle_imports import bundle_module, use_bundle
from input_checks import InputError, check_case, load_cases

__all__ = ["BatchOptions", "BundleRunner", "Shard", "WorkflowError", "bundle_cases", "provenance", "quality_check",
           "save_overview", "run_batch", "with_bundle_defaults", "main"]

DONE_MARKER = "done.json"
STAGING = ".staging"
# how long the ranks of a sharded run wait for the slowest share before merging their rows
MERGE_TIMEOUT = timedelta(days=7)
logger = logging.getLogger("batch_infer")


@dataclass(frozen=True)
class BatchOptions:
    """How :func:`run_batch` runs a bundle (everything except the bundle, the cases and the output folder).

    Args:
        checkpoint: the weights (default ``<bundle>/models/model.pt``); sets the config's top-level ``checkpoint``
            key, which the bundle's ``CheckpointLoader`` reads (``weights_only=True``).
        overlay: config files appended after ``inference.json`` (paths relative to the bundle or absolute), e.g.
            ``configs/cpu_demo.json``.
        split: the datalist split to read when the inputs are a dict of splits.
        device: e.g. ``"cpu"`` or ``"cuda:0"``; the bundle's default (CUDA when available) when ``None``.
        sw_batch_size: windows (or slices) per forward pass; lower it to lower peak memory.
        png: also write ``<case>_overview.png`` through the largest predicted lesion.
        qc_threshold: mean doubt (uncertainty, or 1 - confidence) inside the mask that flags a case for review
            (``None``: the bundle's ``metadata.json`` ``quality_control.doubt_threshold``).
        modality_suffixes: file-name suffixes of the modalities for folder inputs (``None``: the bundle's
            ``metadata.json`` ``channel_file_suffixes``).
        override: further config overrides, ``{"id#path": value}``.
        progress: show a progress bar.
    """

    checkpoint: str | None = None
    overlay: str | Sequence[str] | None = None
    split: str = "test"
    device: str | None = None
    sw_batch_size: int | None = None
    png: bool = False
    qc_threshold: float | None = None
    modality_suffixes: Sequence[str] | None = None
    override: dict | None = None
    progress: bool = True

    @property
    def overlays(self) -> list[str]:
        """``overlay`` as a list."""
        return [self.overlay] if isinstance(self.overlay, (str, os.PathLike)) else list(self.overlay or [])


def with_bundle_defaults(options: BatchOptions, meta: dict) -> BatchOptions:
    """``options`` with the bundle's defaults (its ``metadata.json``) where they are ``None``: the modalities'
    file-name suffixes (``network_data_format.inputs.image.channel_file_suffixes``) and the QC threshold
    (``quality_control.doubt_threshold``)."""
    if options.modality_suffixes is None:
        image = meta["network_data_format"]["inputs"]["image"]
        options = replace(options, modality_suffixes=tuple(image.get("channel_file_suffixes", ())))
    if options.qc_threshold is None:
        options = replace(options, qc_threshold=meta.get("quality_control", {}).get("doubt_threshold"))
    return options


@dataclass(frozen=True)
class Shard:
    """This process's share of a run started by ``torchrun``: rank ``rank`` of ``world`` processes.

    Args:
        rank: the global rank (``RANK``).
        world: the number of processes (``WORLD_SIZE``).
        local_rank: the rank on this machine (``LOCAL_RANK``), which picks the GPU.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Shard:
        """The shard ``torchrun`` describes in the environment (one process of one when it is not set)."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    def take(self, records: list[dict]) -> list[dict]:
        """This rank's cases: ``records[rank::world]`` (disjoint across ranks, together every case once)."""
        return records[self.rank::self.world]

    @property
    def staging(self) -> str:
        """The folder (inside ``out_dir``) this rank's bundle runs write to."""
        return STAGING if self.world == 1 else f"{STAGING}-{self.rank}"


def bundle_cases(bundle: str | os.PathLike, inputs: str, options: BatchOptions = BatchOptions()) -> list[dict]:
    """The cases of ``inputs`` (:func:`input_checks.load_cases`), named by the bundle's own rule
    (``scripts/case_meta.py``) with its modalities' file-name suffixes (or ``options.modality_suffixes``)."""
    bundle = Path(bundle).resolve()
    if options.modality_suffixes is None:  # not resolved by the caller yet
        options = with_bundle_defaults(options, json.loads((bundle / "configs" / "metadata.json").read_text()))
    case_name = bundle_module(bundle, "case_meta").case_name
    return load_cases(inputs, case_name, split=options.split, modality_suffixes=options.modality_suffixes)


class BundleRunner:
    """A bundle's inference workflow, built once, run one case at a time.

    Args:
        bundle: the bundle folder (with ``configs/inference.json``).
        staging_dir: the folder the bundle writes its outputs to (its ``output_dir``).
        first_record: the first case, ``{"image": path or [paths]}``; the workflow's dataset holds one record.
        options: checkpoint, overlays, device, ``sw_batch_size`` and overrides (:class:`BatchOptions`).
    """

    def __init__(
        self,
        bundle: str | os.PathLike,
        staging_dir: str | os.PathLike,
        first_record: dict,
        options: BatchOptions = BatchOptions(),
    ) -> None:
        from monai.bundle import ConfigParser, ConfigWorkflow

        self.bundle = use_bundle(Path(bundle).resolve())
        self.staging_dir = Path(staging_dir)
        configs = self.bundle / "configs"
        config_files = [str(configs / "inference.json")]
        config_files += [str(p if os.path.isabs(p) else self.bundle / p) for p in options.overlays]
        pairs: dict[str, Any] = {"bundle_root": str(self.bundle), "output_dir": os.fspath(staging_dir)}
        pairs["data"] = [{"image": first_record["image"]}]
        if options.checkpoint is not None:
            if "checkpoint" not in ConfigParser.load_config_files(config_files):
                raise KeyError(f"{config_files[0]} has no top-level 'checkpoint' key to point at {options.checkpoint}")
            pairs["checkpoint"] = os.path.abspath(options.checkpoint)
        if options.device is not None:
            pairs["device"] = options.device
        if options.sw_batch_size is not None:
            pairs["sw_batch_size"] = int(options.sw_batch_size)
        pairs.update(options.override or {})
        self.workflow = ConfigWorkflow(
            config_file=config_files,
            meta_file=str(configs / "metadata.json"),
            logging_file=False,
            workflow_type="infer",
            **pairs,
        )
        self.workflow.initialize()
        self.dataset = self.workflow.parser.get_parsed_content("dataset")

    def __call__(self, record: dict) -> None:
        """Run the workflow on one case ``{"image": path or [paths]}``; outputs land in ``staging_dir``."""
        self.dataset.data = [{"image": record["image"]}]
        self.workflow.run()


def quality_check(mask: np.ndarray, doubt: np.ndarray | None, threshold: float | None,
                  implausible: Sequence[str] = ()) -> dict[str, Any]:
    """Per-case QC flag from the predicted mask, a voxel doubt map (uncertainty, or 1 - confidence) and the
    quantification's implausible values.

    Args:
        mask: predicted mask, any shape; non-zero is tumour.
        doubt: same shape, higher = less trustworthy; ``None`` when the bundle writes no such map.
        threshold: mean doubt inside the mask above which the case needs review (``None``: only an empty mask
            needs review; the mean doubt is still recorded).
        implausible: sentences naming quantification values that contradict the mask (the ``implausible`` entry
            of the liver bundle's quantification report); any makes the case need review.

    Returns:
        ``{"needs_review": bool, "reason": str, "tumour_voxels": int, "mean_doubt_in_mask": float | None}``.
    """
    inside = np.asarray(mask) > 0
    voxels = int(inside.sum())
    reasons, mean = [], None
    if voxels == 0:
        reasons.append("empty mask: no tumour predicted")
    elif doubt is not None:
        if np.shape(doubt) != inside.shape:
            raise ValueError(f"doubt map shape {np.shape(doubt)} differs from mask shape {inside.shape}")
        mean = float(np.asarray(doubt, dtype=np.float64)[inside].mean())
        if threshold is not None and mean > threshold:
            reasons.append(f"mean doubt {mean:.3f} inside the predicted tumour exceeds {threshold:g}")
    if implausible:
        more = f" (and {len(implausible) - 1} more)" if len(implausible) > 1 else ""
        reasons.append(f"implausible quantification: {implausible[0]}{more}")
    return {"needs_review": bool(reasons), "reason": "; ".join(reasons), "tumour_voxels": voxels,
            "mean_doubt_in_mask": mean}


def largest_lesion_slice(mask: np.ndarray) -> int:
    """Index along the last axis through the centre of the largest connected lesion (the middle slice if none)."""
    from scipy import ndimage

    labels, n = ndimage.label(np.asarray(mask) > 0)
    if n == 0:
        return mask.shape[-1] // 2
    sizes = np.bincount(labels.ravel())[1:]
    centre = ndimage.center_of_mass(labels == (int(np.argmax(sizes)) + 1))
    return int(round(centre[-1]))


def save_overview(image: np.ndarray, mask: np.ndarray, doubt: np.ndarray | None, path: str, title: str,
                  doubt_name: str = "uncertainty") -> int:
    """PNG through the largest predicted lesion: the image, the image with the mask contour, the doubt map.

    Args:
        image: ``[H, W, D]`` image (first channel).
        mask: ``[H, W, D]`` predicted mask.
        doubt: ``[H, W, D]`` map shown in the third panel (``None``: the mask instead).
        path: the PNG file.
        title: the figure title (case id and QC).
        doubt_name: the third panel's label.

    Returns:
        the slice index shown.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = largest_lesion_slice(mask)
    img, msk = np.asarray(image)[..., z].T, np.asarray(mask)[..., z].T > 0
    third = (np.asarray(doubt)[..., z] if doubt is not None else np.asarray(mask)[..., z]).T
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    axes[0].imshow(img, cmap="gray", origin="lower")
    axes[0].set_title(f"image, slice {z}")
    axes[1].imshow(img, cmap="gray", origin="lower")
    if msk.any():
        axes[1].contour(msk, levels=[0.5], colors="red", linewidths=1.0)
    axes[1].set_title("predicted mask (contour)")
    shown = axes[2].imshow(third, cmap="magma", origin="lower", vmin=0.0, vmax=1.0)
    if msk.any():
        axes[2].contour(msk, levels=[0.5], colors="cyan", linewidths=0.8)
    axes[2].set_title(doubt_name if doubt is not None else "mask")
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return z


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(bundle: Path, meta: dict, options: BatchOptions) -> dict[str, Any]:
    """What produced a run's outputs: ``{"bundle", "bundle_version", "checkpoint", "checkpoint_sha256", "overlays",
    "override"}``.

    Args:
        bundle: the bundle folder.
        meta: its ``configs/metadata.json``.
        options: the run's checkpoint (``None``: the bundle's ``models/model.pt``), overlays and overrides.
    """
    path = Path(options.checkpoint).resolve() if options.checkpoint else bundle / "models" / "model.pt"
    return {"bundle": bundle.name, "bundle_version": meta.get("version"), "checkpoint": str(path),
            "checkpoint_sha256": _sha256(path), "overlays": [str(o) for o in options.overlays],
            "override": json.loads(json.dumps(options.override or {}, default=str))}


def _changed(old: dict | None, new: dict) -> list[str]:
    """The provenance keys that differ (all of them for an output without provenance)."""
    return [k for k in new if (old or {}).get(k) != new[k]] if old is not None else list(new)


def _write_json(path: str | os.PathLike, content: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=2, default=str)
    os.replace(tmp, path)


def _gather_outputs(staging: Path, case: str, partial: Path) -> dict[str, str]:
    """Move the bundle's outputs (``<staging>/<name>/<name>_<postfix>.<ext>``) to ``partial/<case>_<postfix>.<ext>``.

    Returns:
        ``{postfix: file name}``, e.g. ``{"seg": "ct_000_seg.nii.gz", "confidence": ...}``.
    """
    outputs = {}
    for folder in sorted(p for p in staging.iterdir() if p.is_dir()):
        for file in sorted(folder.iterdir()):
            if not file.name.startswith(folder.name + "_"):
                continue
            rest = file.name[len(folder.name) + 1:]
            postfix = rest.split(".", 1)[0]
            name = f"{case}_{rest}"
            os.replace(file, partial / name)
            outputs[postfix] = name
    if "seg" not in outputs:
        raise RuntimeError(f"the bundle wrote no '<case>_seg' mask into {staging}")
    return outputs


def doubt_map(meta: dict) -> tuple[str, bool] | None:
    """The bundle's voxel map of doubt, from its ``metadata.json`` ``quality_control.doubt_map``: the output's name
    (``<case>_<name>.nii.gz``) and whether it must be flipped (``"doubt": "1 - value"``, a confidence) to read as
    doubt; ``None`` when the bundle writes none."""
    spec = meta.get("quality_control", {}).get("doubt_map")
    if not spec:
        return None
    if spec["doubt"] not in ("value", "1 - value"):
        raise ValueError(f"quality_control.doubt_map.doubt must be 'value' or '1 - value', got {spec['doubt']!r}")
    return spec["output"], spec["doubt"] == "1 - value"


def _doubt_map(partial: Path, outputs: dict[str, str], spec: tuple[str, bool] | None) -> tuple[np.ndarray | None, str]:
    if spec is None or spec[0] not in outputs:
        return None, ""
    name, flip = spec
    values = np.asarray(nib.load(partial / outputs[name]).dataobj, dtype=np.float32)
    return (1.0 - values, f"1 - {name}") if flip else (values, name)


def _first_channel(paths: str | list[str]) -> np.ndarray:
    """The first channel of a case's image as its outputs are laid out (a DICOM series as MONAI's reader stacks it)."""
    first = paths if isinstance(paths, str) else paths[0]
    if os.path.isdir(first):
        from monai.transforms import LoadImage

        return np.asarray(LoadImage(image_only=True)(first), dtype=np.float32)
    data = np.asarray(nib.load(first).dataobj, dtype=np.float32)
    return data[..., 0] if data.ndim == 4 else data


def _process(runner: BundleRunner, record: dict, out_dir: Path, qc_threshold: float | None, png: bool,
             made_by: dict[str, Any], doubt_spec: tuple[str, bool] | None) -> dict[str, Any]:
    """Run one validated case into ``.partial-<case>`` and move it into place; returns its ``done.json``."""
    case = record["case"]
    staging, partial, final = runner.staging_dir, out_dir / f".partial-{case}", out_dir / case
    for folder in (staging, partial):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    start = time.perf_counter()
    runner(record)
    outputs = _gather_outputs(staging, case, partial)
    mask = np.asarray(nib.load(partial / outputs["seg"]).dataobj)
    doubt, doubt_name = _doubt_map(partial, outputs, doubt_spec)
    report = json.loads((partial / outputs["quantification"]).read_text()) if "quantification" in outputs else {}
    qc = quality_check(mask, doubt, qc_threshold, report.get("implausible", ()))
    if png:
        image = _first_channel(record["image"])
        name = f"{case}_overview.png"
        flag = f"NEEDS REVIEW: {qc['reason']}" if qc["needs_review"] else "QC ok"
        qc["png_slice"] = save_overview(image if image.shape == mask.shape else np.zeros(mask.shape), mask, doubt,
                                        str(partial / name), f"{case}: {flag}", doubt_name or "mask")
        outputs["overview"] = name
    done = {"case": case, "image": record["image"], "outputs": outputs, "qc": qc,
            "seconds": round(time.perf_counter() - start, 3), "bundle": str(runner.bundle), "provenance": made_by}
    _write_json(partial / DONE_MARKER, done)
    if final.exists():  # an unfinished folder from an interrupted run (done cases are skipped before this)
        shutil.rmtree(final)
    os.replace(partial, final)
    shutil.rmtree(staging, ignore_errors=True)
    return done


class WorkflowError(RuntimeError):
    """The bundle's workflow could not be built (config, network or checkpoint): no case can run."""


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (MONAI wraps config evaluation errors in ``RuntimeError``)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return error


def _build_runner(bundle: Path, staging: Path, record: dict, options: BatchOptions) -> BundleRunner:
    try:
        return BundleRunner(bundle, staging, record, options)
    except Exception as e:
        cause = _root_cause(e)
        raise WorkflowError(f"cannot build the inference workflow of {bundle}: {type(cause).__name__}: "
                            f"{str(cause).splitlines()[0] if str(cause) else ''}") from e


def _write_summary(out_dir: Path, rows: list[dict], meta: dict, name: str = "run_summary") -> None:
    """``<name>.json`` (``meta`` and the rows) and ``<name>.csv`` (one line per row) in ``out_dir``."""
    _write_json(out_dir / f"{name}.json", {**meta, "cases": rows})
    fields = ["case", "status", "reason", "seconds", "needs_review", "qc_reason", "outputs"]
    fields += [f for f in ("rank", "host") if any(f in row for row in rows)]
    tmp = out_dir / f"{name}.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "outputs": ";".join(row.get("outputs", {}).values())})
    os.replace(tmp, out_dir / f"{name}.csv")


def _run_cases(records: list[dict], bundle: Path, meta: dict, out: Path, staging: Path, options: BatchOptions,
               made_by: dict[str, Any], progress: tuple[str, dict], rows: list[dict]) -> None:
    """Run ``records`` one by one, appending one row per case to ``rows`` and rewriting the progress summary
    (``progress``: its file name and metadata) after each.

    Raises:
        WorkflowError: the bundle's workflow cannot be built; its row is in ``rows``.
    """
    image = meta["network_data_format"]["inputs"]["image"]
    channels, modality = int(image.get("num_channels", 1)), image.get("modality")
    rule = bundle_module(bundle, "modality")  # the rule the bundle's inference preprocessing applies too
    series = bundle_module(bundle, "dicom_series")  # and its check of DICOM series folders
    runner: BundleRunner | None = None
    name, summary_meta = progress
    for record in tqdm(records, desc=bundle.name, unit="case", disable=not options.progress):
        case, start = record["case"], time.perf_counter()
        row: dict[str, Any] = {"case": case, "status": "", "reason": "", "seconds": 0.0, "needs_review": "",
                               "qc_reason": "", "outputs": {}}
        marker = out / case / DONE_MARKER
        try:
            if marker.is_file():
                done = json.loads(marker.read_text())
                changed = _changed(done.get("provenance"), made_by)
                if not changed:
                    row.update(status="skipped", reason="already done", outputs=done["outputs"])
                    row.update(needs_review=done["qc"]["needs_review"], qc_reason=done["qc"]["reason"])
                    rows.append(row)
                    continue
                row["reason"] = f"recomputed: the earlier output was made with another {', '.join(changed)}"
            check_case(record, modalities=channels, modality=modality, rule=rule, series=series)
            if runner is None:
                runner = _build_runner(bundle, staging, record, options)
            done = _process(runner, record, out, options.qc_threshold, options.png, made_by, doubt_map(meta))
            row.update(status="done", outputs=done["outputs"], needs_review=done["qc"]["needs_review"],
                       qc_reason=done["qc"]["reason"], qc=done["qc"])
        except InputError as e:
            row.update(status="invalid", reason=str(e))
        except WorkflowError as e:
            row.update(status="failed", reason=str(e), seconds=round(time.perf_counter() - start, 3))
            rows.append(row)
            _write_summary(out, rows, {**summary_meta, "error": str(e)}, name)
            raise
        except Exception as e:  # noqa: BLE001 - one failing case must not stop the others
            logger.exception("case %s failed", case)
            runner = None  # an ignite engine that raised does not run cleanly again: rebuild for the next case
            cause = _root_cause(e)
            row.update(status="failed", reason=f"{type(e).__name__}: {e}" if cause is e else
                       f"{type(e).__name__}: {e} (caused by {type(cause).__name__}: {cause})")
            shutil.rmtree(out / f".partial-{case}", ignore_errors=True)
        row["seconds"] = round(time.perf_counter() - start, 3)
        rows.append(row)
        _write_summary(out, rows, summary_meta, name)


def _gather(rows: list[dict], error: str | None, shard: Shard, order: list[str]) -> tuple[list[dict], list[str]]:
    """Every rank's rows, in the case list's ``order``, and their workflow errors (``"rank r: ..."``), on every rank
    (``torch.distributed.all_gather_object``; a gloo process group is started here when none is)."""
    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", timeout=MERGE_TIMEOUT)
    try:
        shares: list[Any] = [None] * shard.world
        dist.all_gather_object(shares, {"rank": shard.rank, "rows": rows, "error": error})
    finally:
        if own_group:
            dist.destroy_process_group()
    position = {case: i for i, case in enumerate(order)}
    merged = sorted((row for share in shares for row in share["rows"]), key=lambda row: position[row["case"]])
    return merged, [f"rank {share['rank']}: {share['error']}" for share in shares if share["error"]]


def run_batch(
    bundle: str,
    inputs: str,
    out_dir: str,
    options: BatchOptions = BatchOptions(),
) -> dict[str, Any]:
    """Run the bundle over every case (this rank's share under ``torchrun``); see the module docstring. Returns the
    run summary (also written to disk).

    Args:
        bundle: the bundle folder.
        inputs: a folder of NIfTI files and / or DICOM series folders, a CSV or a datalist JSON whose images may be
            series folders (:func:`input_checks.load_cases`).
        out_dir: where the per-case folders and ``run_summary.json``/``.csv`` go.
        options: how to run it (:class:`BatchOptions`).

    Raises:
        InputError: the case list is unusable (missing, empty, duplicate case ids).
        WorkflowError: the bundle's workflow cannot be built (bad config, overlay or checkpoint), on any rank; the
            summary records it.
    """
    bundle_path = Path(bundle).resolve()
    meta = json.loads((bundle_path / "configs" / "metadata.json").read_text())
    options = with_bundle_defaults(options, meta)
    records = bundle_cases(bundle_path, inputs, options)
    shard = Shard.from_env()
    if shard.world > 1 and options.device is None:
        import torch

        options = replace(options, device=f"cuda:{shard.local_rank}" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    made_by = provenance(bundle_path, meta, options)
    summary_meta = {"bundle": str(bundle_path), "inputs": os.path.abspath(inputs), "out_dir": str(out),
                    "checkpoint": options.checkpoint, "provenance": made_by, "qc_threshold": options.qc_threshold,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    progress = "run_summary" if shard.world == 1 else f"run_summary.rank{shard.rank}"
    rows: list[dict] = []
    failure: WorkflowError | None = None
    try:
        _run_cases(shard.take(records), bundle_path, meta, out, out / shard.staging, options, made_by,
                   (progress, summary_meta), rows)
    except WorkflowError as e:
        failure = e
    shutil.rmtree(out / shard.staging, ignore_errors=True)
    errors = [str(failure)] if failure else []
    if shard.world > 1:
        host = socket.gethostname()
        rows = [{**row, "rank": shard.rank, "host": host} for row in rows]
        rows, errors = _gather(rows, str(failure) if failure else None, shard, [record["case"] for record in records])
        for suffix in ("json", "csv"):
            (out / f"{progress}.{suffix}").unlink(missing_ok=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "invalid", "failed")}
    counts["needs_review"] = sum(r["needs_review"] is True for r in rows)
    summary_meta.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), counts=counts)
    if errors:
        summary_meta["error"] = "; ".join(errors)
    if shard.rank == 0:
        _write_summary(out, rows, summary_meta)
    if failure is not None and shard.world == 1:
        raise failure
    if errors:
        raise WorkflowError(summary_meta["error"])
    return {**summary_meta, "cases": rows}


def main(
    bundle: str,
    inputs: str,
    out_dir: str,
    checkpoint: str | None = None,
    overlay: str | Sequence[str] | None = None,
    split: str = "test",
    device: str | None = None,
    sw_batch_size: int | None = None,
    png: bool = False,
    qc_threshold: float | None = None,
    modality_suffixes: Sequence[str] | None = None,
    override: dict | None = None,
) -> None:
    """Fire entry point of :func:`run_batch`; exits with 1 when a case failed or was invalid, 2 on a bad case list.

    Args:
        bundle: the bundle folder.
        inputs: a folder of NIfTI files and / or DICOM series folders (a multi-modal case: one per modality, named
            with the modality suffixes), a CSV (``case``, ``image`` with ``;`` between modalities, ``label``) or
            a datalist JSON (a list of records or a dict of splits).
        out_dir: where the per-case folders and ``run_summary.json``/``.csv`` go.
        checkpoint, overlay, split, device, sw_batch_size, png, qc_threshold, modality_suffixes, override: see
            :class:`BatchOptions` (e.g. ``--overlay configs/cpu_demo.json``,
            ``--override "{'inferer#device': 'cpu'}"``).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = BatchOptions(checkpoint, overlay, split, device, sw_batch_size, png, qc_threshold, modality_suffixes,
                           override)
    try:
        summary = run_batch(bundle, inputs, out_dir, options)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    counts = summary["counts"]
    print(json.dumps(counts))
    for row in summary["cases"]:
        if row["status"] in ("invalid", "failed"):
            print(f"{row['status']}: {row['case']}: {row['reason']}", file=sys.stderr)
    if counts["invalid"] or counts["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    fire.Fire(main)
