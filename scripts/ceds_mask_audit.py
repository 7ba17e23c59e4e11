"""What the CEDS consistency mask keeps: the teacher's pseudo-labels on unlabelled patches, checked against labels.

The phantoms' "unlabelled" training volumes have labels, which training never reads. This tool draws patches of
them as the unlabelled stream does (``RandSpatialCropSamplesd`` over the volume cropped to the body, no label-guided
sampling), runs a training checkpoint's EMA teacher on them as :meth:`scripts.trainer.CEDSTrainer.run_teacher` does
(the config's ``teacher_train_mode`` and weak ``teacher_noise``), builds the config's consistency mask with
:meth:`scripts.losses.ConfidenceMaskedConsistencyLoss.kept`, and counts, against the labels:

- ``tumour_precision``: of the voxels the teacher calls tumour, the share that is tumour; ``kept_tumour_precision``:
  the same among the kept ones (the sharpened targets that pull the student towards tumour);
- ``tumour_recall``: of the tumour voxels, the share the teacher calls tumour; ``tumour_kept_as_background``: the
  share of tumour voxels kept with a background target (the consistency then pulls the student's tumour away);
- ``kept_share``: the share of voxels kept, for each predicted class;
- ``confidence_auroc``: how well the teacher's P(correct) ranks its correct voxels above its wrong ones, within
  each predicted class (0.5: no better than chance, so the mask selects nothing); ``probability_auroc``: the same
  for the teacher's own top softmax probability, the score a confidence head has to beat;
  ``tumour_auroc_within_patch``: the median over patches of both AUROCs within predicted tumour, one patch at a time
  (over the patches that hold right and wrong predicted tumour), which no patch-level shift of a score can explain;
- ``mean_score``: the mean of each score over the right and over the wrong voxels of each predicted class.

Usage (both datalists of one benchmark data folder; the fully labelled one gives the labels):
    python scripts/ceds_mask_audit.py --checkpoint <models/checkpoint.pt> \
        --datalist <data>/datalist_10.json --labels <data>/datalist_100.json [--batches 100] [--weights model] \
        [--out audit.json]
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
BINS = 1000


def histogram_auroc(correct: np.ndarray, wrong: np.ndarray) -> float | None:
    """AUROC of a score from its histograms over ``BINS`` equal bins of [0, 1] (ties within a bin count half)."""
    n_correct, n_wrong = correct.sum(), wrong.sum()
    if n_correct == 0 or n_wrong == 0:
        return None
    wrong_below = np.cumsum(wrong) - wrong
    return float(((wrong_below + 0.5 * wrong) * correct).sum() / (n_correct * n_wrong))


def load_network(checkpoint: str, weights: str = "ema", overlay: str | None = "configs/cpu_demo.json",
                 train: dict | None = None) -> tuple[object, torch.nn.Module]:
    """The bundle's training config (``train.json``, ``overlay``, then ``train`` overrides) and its ``network_def``
    with the weights of ``checkpoint[weights]`` (``"ema"``: the teacher, an ``AveragedModel`` state; ``"model"``:
    the student).

    Returns:
        ``(parser, network)``: the ``monai.bundle.ConfigParser`` and the network, in training mode.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), *([str(BUNDLE / overlay)] if overlay else [])])
    parser["bundle_root"] = str(BUNDLE)
    for key, value in (train or {}).items():
        parser[key] = value
    network = parser.get_parsed_content("network_def")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)[weights]
    network.load_state_dict({k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"})
    return parser, network


def main(checkpoint: str, datalist: str, labels: str, split: str = "unlabeled", batches: int = 100, seed: int = 0,
         overlay: str | None = "configs/cpu_demo.json", teacher_train_mode: bool | None = None,
         weights: str = "ema", train: dict | None = None, out: str | None = None) -> None:
    """Audit the consistency mask of ``checkpoint``'s teacher on one split of ``datalist``.

    Args:
        checkpoint: a training checkpoint with the EMA teacher under ``"ema"`` (``models/checkpoint.pt`` or
            ``checkpoint_epoch=N.pt``).
        datalist: the run's datalist.
        labels: a datalist whose records hold the same cases with ``label`` (e.g. ``datalist_100.json``).
        split: the split of ``datalist`` audited: ``unlabeled`` (what the mask sees in training), ``training`` (the
            labelled patches the confidence head learns from, here sampled like unlabelled ones) or ``validation``.
        batches: unlabelled batches drawn (``unlabeled_batch_size`` volumes, ``num_samples`` patches each).
        seed: seed of the volume choice, crops and noise.
        overlay: a config overlay relative to the bundle (``None``: the bundle's defaults).
        teacher_train_mode: override the config's ``teacher_train_mode`` (batch-norm statistics of the batch).
        weights: the checkpoint entry that acts as the teacher: ``"ema"`` (the teacher) or ``"model"`` (the student,
            e.g. of a supervised run, whose EMA is not trained).
        train: the run's config overrides, e.g. ``{"confidence_kept_fraction": [0.5, 1.0]}`` of a trial.
        out: optional JSON file for the result.

    Prints (and writes to ``out``) the counts and rates listed in the module docstring.
    """
    from monai.transforms import Compose, RandSpatialCropSamplesd
    from monai.utils import set_determinism

    use_bundle(BUNDLE)
    load_datalist = bundle_module(BUNDLE, "datalist").load_datalist
    add_clipped_noise = bundle_module(BUNDLE, "trainer").add_clipped_noise

    parser, teacher = load_network(checkpoint, weights, overlay, train)
    train_mode = parser.get_parsed_content("teacher_train_mode") if teacher_train_mode is None else teacher_train_mode
    teacher.train(bool(train_mode))
    consistency = parser.get_parsed_content("consistency_loss")
    noise = parser.get_parsed_content("teacher_noise")
    volumes_per_batch = parser.get_parsed_content("unlabeled_batch_size")

    cases = {r["case"] for r in load_datalist(datalist, split)}
    labelled = {r["case"]: r for s in ("training", "validation", "test") for r in load_datalist(labels, s)}
    records = [labelled[c] for c in sorted(cases) if c in labelled]
    if len(records) != len(cases):
        raise ValueError(f"{labels} labels {len(records)} of the {len(cases)} {split} cases of {datalist}.")
    set_determinism(seed)
    load = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    crop = RandSpatialCropSamplesd(["image", "label"], parser.get_parsed_content("roi_size"),
                                   parser.get_parsed_content("num_samples"), random_size=False).set_random_state(seed)
    volumes = [load({"image": r["image"], "label": r["label"]}) for r in records]
    rng = np.random.default_rng(seed)

    counts = {c: {"voxels": 0, "tumour": 0, "kept": 0, "kept_tumour": 0} for c in ("tumour", "background")}
    hist = {(score, c): {"correct": np.zeros(BINS, np.int64), "wrong": np.zeros(BINS, np.int64)}
            for score in ("confidence", "probability") for c in counts}
    within_patch = {"confidence": [], "probability": []}
    sums = {(score, c, r): [0.0, 0]
            for score in ("confidence", "probability") for c in counts for r in ("right", "wrong")}
    for _ in range(batches):
        patches = [p for i in rng.choice(len(volumes), volumes_per_batch, replace=False) for p in crop(volumes[i])]
        image = torch.stack([p["image"].as_tensor() for p in patches])
        truth = torch.stack([p["label"].as_tensor() for p in patches]) > 0.5
        with torch.no_grad():
            seg, confidence = teacher.forward_with_confidence(add_clipped_noise(image, *noise))
        predicted = seg.argmax(1, keepdim=True) == 1
        kept = consistency.kept(seg, confidence) > 0
        scores = {"confidence": torch.softmax(confidence, 1)[:, 1:2],
                  "probability": torch.softmax(seg, 1).amax(1, keepdim=True)}
        for name, where in (("tumour", predicted), ("background", ~predicted)):
            counts[name]["voxels"] += int(where.sum())
            counts[name]["tumour"] += int((where & truth).sum())
            counts[name]["kept"] += int((where & kept).sum())
            counts[name]["kept_tumour"] += int((where & kept & truth).sum())
            correct = truth if name == "tumour" else ~truth
            for score, value in scores.items():
                bins = (value.clamp(0, 1 - 1e-7) * BINS).long()
                hist[score, name]["correct"] += np.bincount(bins[where & correct].numpy(), minlength=BINS)
                hist[score, name]["wrong"] += np.bincount(bins[where & ~correct].numpy(), minlength=BINS)
                for right, voxels in (("right", where & correct), ("wrong", where & ~correct)):
                    sums[score, name, right][0] += float(value[voxels].sum())
                    sums[score, name, right][1] += int(voxels.sum())
        for score, value in scores.items():  # predicted tumour, one patch at a time
            bins = (value.clamp(0, 1 - 1e-7) * BINS).long()
            for i in range(bins.shape[0]):
                right, wrong = predicted[i] & truth[i], predicted[i] & ~truth[i]
                auroc = histogram_auroc(np.bincount(bins[i][right].numpy(), minlength=BINS),
                               np.bincount(bins[i][wrong].numpy(), minlength=BINS))
                if auroc is not None:
                    within_patch[score].append(auroc)

    t, b = counts["tumour"], counts["background"]
    rate = lambda a, n: a / n if n else None  # noqa: E731
    result = {
        "checkpoint": checkpoint, "weights": weights, "train": train or {}, "datalist": datalist, "split": split,
        "batches": batches, "seed": seed, "teacher_train_mode": bool(train_mode), "counts": counts,
        "tumour_precision": rate(t["tumour"], t["voxels"]),
        "kept_tumour_precision": rate(t["kept_tumour"], t["kept"]),
        "tumour_recall": rate(t["tumour"], t["tumour"] + b["tumour"]),
        "tumour_kept_as_background": rate(b["kept_tumour"], t["tumour"] + b["tumour"]),
        "kept_share": {c: rate(counts[c]["kept"], counts[c]["voxels"]) for c in counts},
        "confidence_auroc": {c: histogram_auroc(**hist["confidence", c]) for c in counts},
        "probability_auroc": {c: histogram_auroc(**hist["probability", c]) for c in counts},
        "mean_score": {score: {c: {r: rate(*sums[score, c, r]) for r in ("right", "wrong")} for c in counts}
                       for score in ("confidence", "probability")},
        "tumour_auroc_within_patch": {score: float(np.median(v)) if v else None for score, v in within_patch.items()},
        "patches_with_right_and_wrong_tumour": len(within_patch["confidence"]),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("checkpoint", "datalist")}, indent=1))
    if out:
        Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    fire.Fire(main)
