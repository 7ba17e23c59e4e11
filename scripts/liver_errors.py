"""Where a cdugjl_liver model's errors are, case by case: missed lesions by type, false positives by organ and in air.

The network, its spacing and the slice-wise inferer come from the bundle's ``inference.json`` (plus an overlay such
as ``configs/cpu_demo.json``); with ``--teacher True`` the network is the contrast-enhanced teacher of
``train_teacher.json`` (its ``in_channels``, 3, and its input, the record's ``image_key`` ``"ce"``: arterial, portal
venous and delayed phases) instead of the T2WI + DWI student. Each case of a datalist split is preprocessed as in
the bundle's validation and inference (orientation RAS, in-plane ``pixdim`` with the slices kept, image bilinear and
label, organ map and lesion masks nearest, channel-wise intensity normalisation of the network input, no crop),
segmented, and compared voxel by voxel with its label:

- false positives are counted by the organ they fall in (the phantoms' ``organs`` map, ``phantoms.LIVER_ORGANS``:
  liver, spleen, kidney, spine, and background for everything else, body wall and air included), and separately
  in the air outside the body, ``fp_air``: the voxels, in each slice, of the connected components (4-connected
  in-plane) of ``T2WI < 0.3 x median(T2WI in the liver organ)`` that touch the in-plane border of the image.
  T2WI is the raw (resampled, not normalised) first image channel; for the threshold, not for the median, it is
  first smoothed by an in-plane median filter of ``air_filter`` pixels (3 by default: the Rician noise of the
  phantom's air otherwise lifts about a fifth of the air voxels above the threshold; ``air_filter=1`` thresholds
  the raw T2WI), and only voxels that are ``background`` in the organ map count as air, so ``fp_air`` is part of
  ``fp_by_organ["background"]``; and, for phantoms with ``max_mimics``, in the benign T2WI-bright foci
  (``fp_mimic``, of ``mimic_voxels``);
- each lesion is scored separately: the phantom generator is run again for the case (``phantoms.liver_case`` with
  the index of the case name ``liver_NNN`` and the ``generator`` entry, seed and keyword arguments, of the
  ``dataset.json`` in the datalist's folder; the regenerated label must equal the label file, or the script stops),
  which gives every lesion's type and mask. Per lesion: ``voxels`` (in the resampled grid), ``detected`` (voxels
  of the lesion predicted tumour), ``fraction_detected`` = detected / voxels, and ``dice``: the Dice of the lesion
  mask against its *local prediction*, the union of the connected components (3D, face-connected) of the
  prediction that overlap the lesion (0 when none does). Two lesions that touch, or that one predicted component
  covers, share that component, so their Dice count each other's voxels as false positives.

Usage:
    python scripts/liver_errors.py --checkpoint <models/model.pt> --datalist <datalist_100.json> \
        [--split validation] [--overlay configs/cpu_demo.json] [--teacher False] [--padding_mode replicate] \
        [--air_filter 3] [--out errors.json]
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import fire
import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

import phantoms
from bundle_imports import bundle_module, use_bundle

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "cdugjl_liver"
ORGANS = {int(k): v for k, v in phantoms.LIVER_ORGANS.items()}
LIVER = 1
AIR_FRACTION = 0.3
IN_PLANE_4 = np.zeros((3, 3, 3), bool)
IN_PLANE_4[:, :, 1] = ndimage.generate_binary_structure(2, 1)


def air_mask(t2w: np.ndarray, organs: np.ndarray, air_filter: int = 3) -> np.ndarray:
    """The air outside the body: border-touching in-plane components of a dark T2WI (see the module docstring).

    Args:
        t2w: raw T2WI ``[X, Y, Z]`` (slices along the last axis).
        organs: the organ map on the same grid (1 = liver).
        air_filter: size of the in-plane median filter applied to ``t2w`` before the threshold (1: none).

    Returns:
        bool ``[X, Y, Z]``, within the organ map's background (0); all False when the organ map holds no liver.
    """
    if not (organs == LIVER).any():
        return np.zeros(t2w.shape, bool)
    threshold = AIR_FRACTION * float(np.median(t2w[organs == LIVER]))
    smoothed = ndimage.median_filter(t2w, size=(air_filter, air_filter, 1)) if air_filter > 1 else t2w
    components, _ = ndimage.label(smoothed < threshold, IN_PLANE_4)
    border = np.unique(np.concatenate([components[0].ravel(), components[-1].ravel(),
                                       components[:, 0].ravel(), components[:, -1].ravel()]))
    return np.isin(components, border[border > 0]) & (organs == 0)


def lesion_scores(pred: np.ndarray, masks: np.ndarray, kinds: list[str], modes: list[int | None]) -> list[dict]:
    """Per-lesion detection: voxels, detected voxels, fraction detected and Dice against the local prediction.

    Args:
        pred: bool prediction ``[X, Y, Z]``.
        masks: bool ``[N, X, Y, Z]``, one mask per lesion.
        kinds: the N lesion types.
        modes: the N lesions' appearance modes (``phantoms.liver_case``'s ``lesion_modes``; ``None``: none).

    Returns:
        one dict per lesion (``type``, ``mode``, ``voxels``, ``detected``, ``fraction_detected``,
        ``predicted_local``, ``dice``); ``fraction_detected`` and ``dice`` are ``None`` for a lesion left with no
        voxel by resampling.
    """
    components, _ = ndimage.label(pred)
    scores = []
    for mask, kind, mode in zip(masks, kinds, modes):
        voxels, detected = int(mask.sum()), int((mask & pred).sum())
        touching = np.unique(components[mask & pred])
        local = np.isin(components, touching[touching > 0])
        predicted_local = int(local.sum())
        scores.append({
            "type": kind, "mode": mode, "voxels": voxels, "detected": detected,
            "fraction_detected": detected / voxels if voxels else None, "predicted_local": predicted_local,
            "dice": 2 * detected / (voxels + predicted_local) if voxels else None,
        })
    return scores


def regenerate(record: dict, generator: dict) -> dict:
    """Regenerate a case with ``phantoms.liver_case`` and check that its label equals the record's label file."""
    case = record.get("case", Path(str(record["label"])).name)
    match = re.fullmatch(r"liver_(\d+)", str(case))
    if match is None:
        raise ValueError(f"case name {case!r} is not liver_NNN: cannot regenerate its lesions.")
    kwargs = dict(generator)
    seed = kwargs.pop("seed")
    data = phantoms.liver_case(int(match.group(1)), seed=seed, **kwargs)
    on_disk = np.asanyarray(nib.load(record["label"]).dataobj)
    if on_disk.shape != data["label"].shape or not np.array_equal(on_disk, data["label"]):
        raise ValueError(f"{case}: phantoms.liver_case(seed={seed}, {kwargs}) does not reproduce {record['label']} "
                         "(different generator arguments, or a generator changed since the data were written).")
    return data


def load_network(checkpoint: str, overlay: str | None = "configs/cpu_demo.json", teacher: bool = False,
                 padding_mode: str | None = None) -> tuple[torch.nn.Module, Any, list[float], str]:
    """The bundle's network with ``checkpoint`` loaded (eval mode), its slice-wise inferer, the ``Spacingd`` pixdim
    (in-plane ``pixdim``, slices kept) and the key of its input, as ``inference.json`` (plus ``overlay``) builds them.

    Args:
        checkpoint: a ``model.pt`` state dict or a training checkpoint holding it under ``"model"``.
        overlay: a config overlay relative to the bundle (``None``: the bundle's defaults).
        teacher: build the contrast-enhanced teacher (``train_teacher.json``'s ``in_channels`` and ``image_key``).
        padding_mode: the inferer's slice padding; ``None``: its configured default.
    """
    from monai.bundle import ConfigParser

    use_bundle(BUNDLE)  # the config's networks are scripts.networks.*, as in the bundle's initialize
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.json"), *([str(BUNDLE / overlay)] if overlay else [])])
    parser["bundle_root"] = str(BUNDLE)
    input_key = "image"
    if teacher:
        teacher_config = ConfigParser.load_config_file(str(BUNDLE / "configs" / "train_teacher.json"))
        parser["in_channels"] = teacher_config["in_channels"]
        input_key = teacher_config["image_key"]
    if padding_mode is not None:
        parser["inferer"]["padding_mode"] = padding_mode
    network = parser.get_parsed_content("network_def")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state))
    network.eval()
    return network, parser.get_parsed_content("inferer"), list(parser.get_parsed_content("pixdim")) + [-1.0], input_key


def unlabelled_volumes(datalist: str, keys: list[str], pixdim: list[float], cases: int) -> Iterator[dict]:
    """The first ``cases`` unlabelled records of a phantom datalist, read as the bundle's networks see them.

    Args:
        datalist: a phantom datalist whose ``unlabeled`` records have ``case`` and ``keys``, with the phantom's
            ``labelsTr/<case>.nii.gz`` beside its ``imagesTr`` (unlabelled for training, known to the phantom).
        keys: the record's network inputs (``"image"``, ``"ce"``), each resampled to ``pixdim`` and normalised
            channel-wise as ``inference.json`` does.
        pixdim: the ``Spacingd`` pixel dimensions (see :func:`load_network`).
        cases: how many records to read.

    Yields:
        ``{key: [C, H, W, D] tensor for each of keys, "label": [1, H, W, D]}`` (nearest-neighbour label).
    """
    from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Orientationd,
                                  Spacingd)

    files = [*keys, "label"]
    preprocess = Compose([LoadImaged(files, image_only=True), EnsureChannelFirstd(files), Orientationd(files, "RAS"),
                          Spacingd(files, pixdim, mode=["bilinear"] * len(keys) + ["nearest"]),
                          NormalizeIntensityd(keys, channel_wise=True)])
    for record in bundle_module(BUNDLE, "datalist").load_datalist(datalist, "unlabeled")[:cases]:
        label = Path(record[keys[0]][0]).parent.parent / "labelsTr" / f"{record['case']}.nii.gz"
        yield preprocess({**{k: record[k] for k in keys}, "label": str(label)})


def modes_summary(cases: list[dict]) -> dict[int, dict]:
    """Per appearance mode (phantoms with ``appearance_modes``): the count and mean fraction detected of its lesions
    and the count and mean fraction called tumour of its mimics (rounded to 3 decimals; ``None`` when it has none);
    empty without modes."""
    lesions = [s for c in cases for s in c["lesions"] if s.get("mode") is not None and s["voxels"]]
    mimics = [m for c in cases for m in c.get("mimics", []) if m["mode"] is not None and m["voxels"]]
    out = {}
    for mode in sorted({s["mode"] for s in lesions} | {m["mode"] for m in mimics}):
        own = [s["fraction_detected"] for s in lesions if s["mode"] == mode]
        benign = [m["called_tumour"] / m["voxels"] for m in mimics if m["mode"] == mode]
        out[mode] = {"lesions": len(own), "lesion_fraction_detected": round(float(np.mean(own)), 3) if own else None,
                     "mimics": len(benign),
                     "mimic_fraction_called_tumour": round(float(np.mean(benign)), 3) if benign else None}
    return out


def main(checkpoint: str, datalist: str, split: str = "validation", overlay: str | None = "configs/cpu_demo.json",
         teacher: bool = False, padding_mode: str | None = None, air_filter: int = 3, out: str | None = None) -> None:
    """Per-case, per-lesion and pooled voxel errors of ``checkpoint`` on ``split`` of ``datalist``.

    Args:
        checkpoint: a ``model.pt`` state dict of the bundle's network (student, or teacher with ``teacher``), or a
            training checkpoint holding it under ``"model"`` (``checkpoint.pt``, ``checkpoint_epoch=N.pt``, as
            written by ``train.json``'s checkpoint saver).
        datalist: a phantom datalist JSON whose records have ``case``, ``image``, ``ce``, ``label`` and ``organs``,
            next to the ``dataset.json`` (with its ``generator`` entry) written by ``phantoms.liver_mri``.
        split: the split to read (``validation``: choices are made there, never on ``test``).
        overlay: a config overlay relative to the bundle (``None``: the bundle's defaults).
        teacher: evaluate the contrast-enhanced teacher (``configs/train_teacher.json``: 3 input channels, the
            record's ``ce`` phases) instead of the T2WI + DWI student.
        padding_mode: the inferer's slice padding (``"replicate"``, the bundle's default since 0.5.2, or
            ``"constant"``, the zero padding before); ``None``: the inferer's configured default.
        air_filter: in-plane median filter size for the air mask of ``fp_air`` (1: threshold the raw T2WI).
        out: optional JSON file for the result.

    Returns:
        None. Prints one line per case and the pooled counts; ``out`` gets ``{"cases": [...], "pooled": {...}}``
        with per case Dice, voxel counts (``label_voxels``, ``tp``, ``fp``, ``fn``), ``fp_by_organ``, ``fp_air``
        and ``lesions`` (see :func:`lesion_scores`), ``mimics`` (per mimic: ``mode``, ``voxels``,
        ``called_tumour``), and pooled the sums of the counts, the pooled and mean case Dice, per lesion type
        ``count``, ``mean_fraction_detected``, ``mean_dice`` (over lesions that kept voxels), ``voxels`` and
        ``detected``, and ``by_mode`` (:func:`modes_summary`).
    """
    from monai.data import MetaTensor
    from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Orientationd,
                                  Spacingd)

    load_datalist = bundle_module(BUNDLE, "datalist").load_datalist
    dataset_json = Path(datalist).resolve().parent / "dataset.json"
    if not dataset_json.is_file() or "generator" not in json.loads(dataset_json.read_text()):
        raise FileNotFoundError(f"{dataset_json} with a 'generator' entry (written by phantoms.liver_mri) is needed "
                                "to regenerate the lesions.")
    generator = json.loads(dataset_json.read_text())["generator"]

    network, inferer, pixdim, input_key = load_network(checkpoint, overlay, teacher, padding_mode)

    # "image" (T2WI + DWI) is always read: its first channel, not normalised, gives the air mask. The lesion masks
    # travel as key "lesions" (channel 0: the label), not "image_*"/"label_*", which monai 1.6 Spacingd takes for
    # meta dicts of "image"/"label".
    file_keys = ["image", "label", "organs"] + (["ce"] if input_key == "ce" else [])
    keys = file_keys + ["lesions"]
    load = Compose([LoadImaged(file_keys, image_only=True), EnsureChannelFirstd(file_keys)])
    spatial = Compose([Orientationd(keys, "RAS"),
                       Spacingd(keys, pixdim, mode=["nearest" if k in ("label", "organs", "lesions") else "bilinear"
                                                    for k in keys])])
    normalise = NormalizeIntensityd(input_key, channel_wise=True)

    cases = []
    pooled = {"tp": 0, "fp": 0, "fn": 0, "label_voxels": 0, "fp_air": 0, "fp_mimic": 0, "mimic_voxels": 0}
    for record in load_datalist(datalist, split):
        case = record.get("case", Path(str(record["label"])).name)
        generated = regenerate(record, generator)
        data = load({k: record[k] for k in file_keys})
        mimics = np.any([generated["label"] < 0, *generated["mimic_masks"]], axis=0)  # benign T2WI-bright foci
        masks = np.stack([generated["label"] > 0, mimics, *generated["lesion_masks"], *generated["mimic_masks"]])
        masks = masks.astype(np.uint8)
        n_lesions = len(generated["lesion_masks"])
        data["lesions"] = MetaTensor(torch.from_numpy(masks), meta=dict(data["label"].meta))
        data = spatial(data)
        t2w = data["image"][0].numpy().copy()  # raw (resampled) T2WI, before the input's normalisation
        data = normalise(data)
        with torch.no_grad():
            pred = inferer(data[input_key][None], network).argmax(1)[0].numpy().astype(bool)
        label = data["label"][0].numpy() > 0.5
        lesions = data["lesions"].numpy() > 0.5
        if not np.array_equal(lesions[0], label):
            raise RuntimeError(f"{case}: the resampled regenerated label differs from the resampled label file.")
        organs = data["organs"][0].numpy().round().astype(int)
        air = air_mask(t2w, organs, air_filter)
        tp, fp, fn = int((pred & label).sum()), int((pred & ~label).sum()), int((~pred & label).sum())
        false_pos = pred & ~label
        c = {
            "case": case, "dice": 2 * tp / max(2 * tp + fp + fn, 1), "label_voxels": int(label.sum()),
            "tp": tp, "fp": fp, "fn": fn,
            "fp_by_organ": {name: int((false_pos & (organs == i)).sum()) for i, name in ORGANS.items()},
            "fp_air": int((false_pos & air).sum()), "air_voxels": int(air.sum()),
            "fp_mimic": int((false_pos & lesions[1]).sum()), "mimic_voxels": int(lesions[1].sum()),
            "lesions": lesion_scores(pred, lesions[2:2 + n_lesions], generated["lesions"],
                                     generated["lesion_modes"]),
            "mimics": [{"mode": mode, "voxels": int(m.sum()), "called_tumour": int((m & pred).sum())}
                       for m, mode in zip(lesions[2 + n_lesions:], generated["mimic_modes"])],
        }
        cases.append(c)
        for k in pooled:
            pooled[k] += c[k]
        found = ", ".join(f"{s['type']} {s['fraction_detected']:.2f}" if s["voxels"] else f"{s['type']} -"
                          for s in c["lesions"]) or "no lesion"
        print(f"{case}: Dice {c['dice']:.3f}, tumour {c['label_voxels']} voxels, missed {fn}, false positive {fp} "
              f"({', '.join(f'{k} {v}' for k, v in c['fp_by_organ'].items() if v)}; air {c['fp_air']}; "
              f"mimics {c['fp_mimic']} of {c['mimic_voxels']}); "
              f"detected: {found}", flush=True)

    pooled["dice"] = 2 * pooled["tp"] / max(2 * pooled["tp"] + pooled["fp"] + pooled["fn"], 1)
    pooled["mean_case_dice"] = float(np.mean([c["dice"] for c in cases])) if cases else None
    pooled["fp_by_organ"] = {name: sum(c["fp_by_organ"][name] for c in cases) for name in ORGANS.values()}
    by_type = {}
    for kind in phantoms.LESION_TYPES:
        scored = [s for c in cases for s in c["lesions"] if s["type"] == kind and s["voxels"]]
        by_type[kind] = {
            "count": len(scored),
            "mean_fraction_detected": float(np.mean([s["fraction_detected"] for s in scored])) if scored else None,
            "mean_dice": float(np.mean([s["dice"] for s in scored])) if scored else None,
            "voxels": sum(s["voxels"] for s in scored), "detected": sum(s["detected"] for s in scored),
        }
    pooled["lesions_by_type"] = by_type
    pooled["by_mode"] = by_mode = modes_summary(cases)
    print(f"mean case Dice {pooled['mean_case_dice'] or 0:.3f}; pooled: Dice {pooled['dice']:.3f}, missed "
          f"{pooled['fn']}, false positive {pooled['fp']} voxels "
          f"({', '.join(f'{k} {v}' for k, v in pooled['fp_by_organ'].items() if v)}; air {pooled['fp_air']}; "
          f"mimics {pooled['fp_mimic']} of {pooled['mimic_voxels']})")
    print("lesions detected (mean fraction / mean lesion Dice, count): " + ", ".join(
        f"{k} {v['mean_fraction_detected']:.3f} / {v['mean_dice']:.3f} ({v['count']})" if v["count"] else f"{k} - (0)"
        for k, v in by_type.items()))
    if by_mode:
        print("by appearance mode (lesions: mean fraction detected; mimics: mean fraction called tumour; count): "
              + ", ".join(f"{m} lesions {v['lesion_fraction_detected']} ({v['lesions']}), mimics "
                          f"{v['mimic_fraction_called_tumour']} ({v['mimics']})" for m, v in by_mode.items()))
    result = {"checkpoint": checkpoint, "datalist": datalist, "split": split, "teacher": teacher,
              "input_key": input_key, "padding_mode": inferer.padding_mode, "air_filter": air_filter,
              "cases": cases, "pooled": pooled}
    if out:
        Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    fire.Fire(main)
