"""How the liver bundle's region-contrast gate treats a trained contrast-enhanced teacher on unlabelled volumes.

On unlabelled slices the region contrast takes its regions (tumour, background) from the frozen CE teacher's
prediction and leaves out the voxels the teacher is least sure of (``scripts.distillation.teacher_region_map``).
This script runs a teacher checkpoint over the unlabelled records of a phantom datalist, preprocessed as in the
bundle's inference (orientation RAS, in-plane ``pixdim``, channel-wise normalisation of the CE phases; the label
read from the phantom's ``labelsTr`` only to score the teacher), and reports for each predicted class how many
voxels, and how many of the teacher's wrong voxels, a gate removes:

- ``threshold``: voxels with ``K / S >= max_uncertainty`` (the rule before ``cdugjl_liver`` 0.6.0);
- ``kept_fraction``: all but the ``kept_fraction`` least uncertain voxels of each predicted class, per volume (the
  rule since 0.6.0, which the training applies per batch).

Usage:
    python scripts/teacher_regions.py --checkpoint <models/teacher/model.pt> --datalist <datalist_10.json> \
        [--cases 12] [--kept_fraction 0.9] [--max_uncertainty 0.5] [--out regions.json]
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import torch

from bundle_imports import bundle_module
from liver_errors import load_network, unlabelled_volumes

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cdugjl_liver"


def main(checkpoint: str, datalist: str, cases: int = 12, kept_fraction: float = 0.9, max_uncertainty: float = 0.5,
         overlay: str | None = "configs/cpu_demo.json", out: str | None = None) -> None:
    """Voxels and wrong voxels each gate removes, per class the teacher predicts, pooled over ``cases`` volumes.

    Args:
        checkpoint: the teacher's ``model.pt`` (or a training checkpoint holding it under ``"model"``).
        datalist: a phantom datalist whose ``unlabeled`` records have ``case`` and ``ce``, with the phantom's
            ``labelsTr/<case>.nii.gz`` beside its ``imagesTr``.
        cases: the first this many unlabelled records are read.
        kept_fraction: the fraction of each predicted class the ``kept_fraction`` gate keeps.
        max_uncertainty: the ``threshold`` gate's ``K / S`` limit.
        overlay: a config overlay relative to the bundle (``None``: the bundle's defaults).
        out: optional JSON file for the result.

    Returns:
        None. Prints one line per class and the largest ``K / S``; ``out`` gets ``{"tumour"|"background": {"voxels",
        "wrong", "threshold": {"removed", "wrong_removed"}, "kept_fraction": {...}}, "largest_uncertainty",
        "settings"}``.
    """
    network, inferer, pixdim, input_key = load_network(checkpoint, overlay, teacher=True)
    consistency = bundle_module(BUNDLE, "consistency")

    result: dict = {name: {"voxels": 0, "wrong": 0, "threshold": {"removed": 0, "wrong_removed": 0},
                           "kept_fraction": {"removed": 0, "wrong_removed": 0}} for name in ("tumour", "background")}
    largest = 0.0
    read = 0
    for read, data in enumerate(unlabelled_volumes(datalist, [input_key], pixdim, cases), 1):
        with torch.no_grad():
            alpha = inferer(data[input_key][None], network).as_tensor()  # [1, K, H, W, D]
        uncertainty = alpha.shape[1] / alpha.sum(1)[0]
        predicted = alpha.argmax(1)[0] > 0
        wrong = predicted != (data["label"][0] > 0.5)
        kept = consistency.uncertainty_mask(alpha, kept_fraction)[0, 0] > 0
        largest = max(largest, float(uncertainty.max()))
        for name, members in (("tumour", predicted), ("background", ~predicted)):
            entry = result[name]
            entry["voxels"] += int(members.sum())
            entry["wrong"] += int((members & wrong).sum())
            for gate, removed in (("threshold", uncertainty >= max_uncertainty), ("kept_fraction", ~kept)):
                entry[gate]["removed"] += int((members & removed).sum())
                entry[gate]["wrong_removed"] += int((members & removed & wrong).sum())
    result["largest_uncertainty"] = largest
    result["settings"] = {"checkpoint": checkpoint, "datalist": datalist, "cases": read,
                          "kept_fraction": kept_fraction, "max_uncertainty": max_uncertainty}
    for name in ("tumour", "background"):
        e = result[name]
        print(f"{name}: {e['voxels']} voxels, {e['wrong']} wrong; K/S >= {max_uncertainty}: removes "
              f"{e['threshold']['removed']} ({e['threshold']['wrong_removed']} wrong); kept fraction {kept_fraction}: "
              f"removes {e['kept_fraction']['removed']} ({e['kept_fraction']['wrong_removed']} wrong)")
    print(f"largest K/S: {largest:.3f}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    fire.Fire(main)
