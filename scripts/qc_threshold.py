"""Choose ``batch_infer.py``'s QC threshold from measured cases: the mean doubt inside the predicted mask that best
separates poor segmentations from good ones on a validation split.

Usage (from the repository root)::

    python scripts/qc_threshold.py --bundle bundles/cdugjl_liver --overlay configs/cpu_demo.json \\
        --checkpoints "[a/model.pt, b/model.pt]" \\
        --datalist outputs/benchmarks/cpu/data/cdugjl_liver/datalist_100.json \\
        --out_dir outputs/qc/cdugjl_liver

Each checkpoint is run over the ``validation`` split with :func:`batch_infer.run_batch` (resumable: finished cases
are skipped); every (checkpoint, case) pair gives the mean doubt inside the predicted mask (``done.json``) and the
Dice of the mask against the case's label. A case is *poor* when its Dice is below ``min_dice``; the threshold is
the one that maximises Youden's J = sensitivity + specificity - 1 for flagging poor cases (mean doubt > threshold),
among the midpoints between measured doubts. Cases with an empty mask are left out (the QC flags an empty mask by
itself); a mask on a tumour-free case has Dice 0 and is poor. The table and the choice go to
``<out_dir>/qc_threshold.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fire
import nibabel as nib
import numpy as np

from batch_infer import DONE_MARKER, BatchOptions, bundle_cases, run_batch

__all__ = ["dice", "youden_threshold", "choose"]


def dice(mask: np.ndarray, label: np.ndarray) -> float:
    """Dice of two binary masks (non-zero is foreground); NaN when both are empty."""
    a, b = np.asarray(mask) > 0, np.asarray(label) > 0
    total = int(a.sum() + b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else float("nan")


def youden_threshold(doubt: Sequence[float], poor: Sequence[bool]) -> dict[str, float]:
    """The doubt threshold (flag when doubt > threshold) that maximises Youden's J for finding the poor cases.

    Args:
        doubt: mean doubt inside the mask, one per case.
        poor: whether each case is poor (should be flagged).

    Returns:
        ``{"threshold", "youden_j", "sensitivity", "specificity"}``; candidates are the midpoints between sorted
        distinct doubts, one below the smallest and the largest (which flags nothing), ties broken by the higher
        threshold (fewer flags), so a doubt that does not separate the cases (J = 0) flags none.

    Raises:
        ValueError: fewer than one poor and one good case.
    """
    d, p = np.asarray(doubt, dtype=np.float64), np.asarray(poor, dtype=bool)
    if p.all() or not p.any():
        raise ValueError(f"need both poor and good cases to choose a threshold (poor: {int(p.sum())} of {p.size})")
    values = np.unique(d)
    # below every doubt (flag all), the midpoints, and the largest doubt (flag none: chosen when nothing separates)
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1]]])
    best: dict[str, float] = {}
    for t in candidates[::-1]:
        flagged = d > t
        sensitivity, specificity = float(flagged[p].mean()), float((~flagged[~p]).mean())
        j = sensitivity + specificity - 1
        if not best or j > best["youden_j"]:
            best = {"threshold": float(t), "youden_j": j, "sensitivity": sensitivity, "specificity": specificity}
    return best


def choose(
    bundle: str,
    checkpoints: Sequence[str],
    datalist: str,
    out_dir: str,
    overlay: str | Sequence[str] | None = None,
    split: str = "validation",
    min_dice: float = 0.5,
) -> dict[str, Any]:
    """Run the checkpoints over ``split`` and choose the QC threshold; see the module docstring.

    Args:
        bundle: the bundle folder.
        checkpoints: the models to measure (e.g. the benchmark's all-label supervised seeds).
        datalist: a datalist JSON whose ``split`` records carry ``label``.
        out_dir: ``<out_dir>/<i>/`` holds the batch inference of checkpoint ``i``; the result is
            ``<out_dir>/qc_threshold.json``.
        overlay: config overlay(s) of the checkpoints (e.g. ``configs/cpu_demo.json``).
        split: the datalist split to measure on (never the test split).
        min_dice: a case with a lower Dice is poor and should be flagged.

    Returns:
        the written result: the per-case table and the chosen threshold.
    """
    if split == "test":
        raise ValueError("choose the threshold on a validation split, not on the test split")
    labels = {r["case"]: r["label"] for r in bundle_cases(bundle, datalist, BatchOptions(split=split))}
    rows = []
    for i, checkpoint in enumerate(checkpoints):
        run_dir = Path(out_dir) / str(i)
        options = BatchOptions(checkpoint=checkpoint, overlay=overlay, split=split, device="cpu", progress=False)
        summary = run_batch(bundle, datalist, str(run_dir), options)
        for case in summary["cases"]:
            if case["status"] not in ("done", "skipped"):
                raise RuntimeError(f"{checkpoint}: case {case['case']} {case['status']}: {case['reason']}")
            done = json.loads((run_dir / case["case"] / DONE_MARKER).read_text())
            mask = np.asarray(nib.load(run_dir / case["case"] / done["outputs"]["seg"]).dataobj)
            label = np.asarray(nib.load(labels[case["case"]]).dataobj)
            rows.append({"checkpoint": str(checkpoint), "case": case["case"], "dice": dice(mask, label),
                         "mean_doubt_in_mask": done["qc"]["mean_doubt_in_mask"]})
    usable = [r for r in rows if r["mean_doubt_in_mask"] is not None]
    choice = youden_threshold([r["mean_doubt_in_mask"] for r in usable], [r["dice"] < min_dice for r in usable])
    result = {"bundle": Path(bundle).name, "datalist": os.path.abspath(datalist), "split": split,
              "min_dice": min_dice, "n_cases": len(usable), "n_poor": sum(r["dice"] < min_dice for r in usable),
              **choice, "cases": rows}
    path = Path(out_dir) / "qc_threshold.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"{result['bundle']}: QC threshold {choice['threshold']:.3f} (Youden J {choice['youden_j']:.2f}, "
          f"sensitivity {choice['sensitivity']:.2f}, specificity {choice['specificity']:.2f}; "
          f"{result['n_poor']} poor of {result['n_cases']} cases with Dice < {min_dice}) -> {path}")
    return result


if __name__ == "__main__":
    fire.Fire(choose, serialize=lambda result: None)  # choose() prints its summary; the JSON is on disk
