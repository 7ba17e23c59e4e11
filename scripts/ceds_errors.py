"""Where a ceds_mediastinum model's errors are, case by case: missed tumour, and false positives by organ.

The network, its input window, spacing and sliding-window settings come from the bundle's ``inference.json`` (plus
an overlay such as ``configs/cpu_demo.json``); each case of a datalist split is resampled and cropped to the body as
in training and inference (image bilinear, label and organ map nearest), segmented, and compared voxel by voxel
with its label. False positives are counted by the organ they fall in (the phantoms' ``organs`` map: lung, heart,
great vessels, bone, airway, mediastinum, or background = body wall and muscle), and the CT value of missed and
found tumour voxels is reported.

Usage:
    python scripts/ceds_errors.py --checkpoint <models/model.pt> --datalist <datalist_100.json> \
        [--split validation] [--overlay configs/cpu_demo.json] [--out errors.json]
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import numpy as np
import torch

from bundle_imports import bundle_module, use_bundle

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ceds_mediastinum"
ORGANS = {0: "background", 1: "lung", 2: "heart", 3: "great vessels", 4: "bone", 5: "airway", 6: "mediastinum"}


def main(checkpoint: str, datalist: str, split: str = "validation", overlay: str | None = "configs/cpu_demo.json",
         out: str | None = None) -> None:
    """Per-case and pooled voxel errors of ``checkpoint`` on ``split`` of ``datalist``.

    Args:
        checkpoint: a ``model.pt`` state dict of the bundle's network, or a training checkpoint holding it under
            ``"model"`` (``checkpoint_epoch=N.pt``).
        datalist: a datalist JSON whose records have ``image``, ``label`` and ``organs``.
        split: the split to read (``validation``: choices are made there, never on ``test``).
        overlay: a config overlay relative to the bundle (``None``: the bundle's defaults).
        out: optional JSON file for the result.

    Prints one line per case and the pooled counts; ``out`` gets ``{"cases": [...], "pooled": {...}}`` with Dice,
    voxel counts (``tp``, ``fp``, ``fn``), false positives per organ and the median CT value (HU) of missed and
    found tumour voxels.
    """
    from monai.bundle import ConfigParser
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged, Orientationd,
                                  ScaleIntensityRanged, Spacingd)

    use_bundle(BUNDLE)  # the config's networks are scripts.networks.*, as in the bundle's initialize
    load_datalist = bundle_module(BUNDLE, "datalist").load_datalist

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.json"), *([str(BUNDLE / overlay)] if overlay else [])])
    parser["bundle_root"] = str(BUNDLE)
    network = parser.get_parsed_content("network_def")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state))
    network.eval()
    inferer = parser.get_parsed_content("inferer")
    low, high = parser.get_parsed_content("hu_window")
    keys = ["image", "label", "organs"]
    transform = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, "RAS"),
                         Spacingd(keys, parser.get_parsed_content("pixdim"), mode=["bilinear", "nearest", "nearest"]),
                         ScaleIntensityRanged("image", low, high, 0.0, 1.0, clip=True),
                         CropForegroundd(keys, source_key="image")])
    cases, pooled = [], {"tp": 0, "fp": 0, "fn": 0}
    for record in load_datalist(datalist, split):
        data = transform({k: record[k] for k in keys})
        with torch.no_grad():
            pred = inferer(data["image"][None], network).argmax(1)[0].numpy().astype(bool)
        label = data["label"][0].numpy() > 0.5
        organs = data["organs"][0].numpy().astype(int)
        hu = data["image"][0].numpy() * (high - low) + low
        tp, fp, fn = int((pred & label).sum()), int((pred & ~label).sum()), int((~pred & label).sum())
        false_pos = pred & ~label
        cases.append({
            "case": record.get("case", Path(str(record["image"])).name),
            "dice": 2 * tp / max(2 * tp + fp + fn, 1), "label_voxels": int(label.sum()), "tp": tp, "fp": fp, "fn": fn,
            "fp_by_organ": {name: int((false_pos & (organs == i)).sum()) for i, name in ORGANS.items()},
            "missed_median_hu": float(np.median(hu[~pred & label])) if fn else None,
            "found_median_hu": float(np.median(hu[pred & label])) if tp else None,
        })
        for k in pooled:
            pooled[k] += cases[-1][k]
        c = cases[-1]
        print(f"{c['case']}: Dice {c['dice']:.3f}, tumour {c['label_voxels']} voxels, missed {fn}, false positive "
              f"{fp} ({', '.join(f'{k} {v}' for k, v in c['fp_by_organ'].items() if v)})", flush=True)
    pooled["dice"] = 2 * pooled["tp"] / max(2 * pooled["tp"] + pooled["fp"] + pooled["fn"], 1)
    pooled["mean_case_dice"] = float(np.mean([c["dice"] for c in cases]))
    pooled["fp_by_organ"] = {name: sum(c["fp_by_organ"][name] for c in cases) for name in ORGANS.values()}
    print(f"mean case Dice {pooled['mean_case_dice']:.3f}; pooled: Dice {pooled['dice']:.3f}, "
          f"missed {pooled['fn']}, false positive {pooled['fp']} voxels")
    result = {"checkpoint": checkpoint, "datalist": datalist, "split": split, "cases": cases, "pooled": pooled}
    if out:
        Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    fire.Fire(main)
