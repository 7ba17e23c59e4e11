"""Can the CEDS confidence branch learn right from wrong? Train it alone on a checkpoint's frozen segmentation.

``scripts/ceds_mask_audit.py`` found trained confidence heads that rank the wrong voxels of predicted tumour above
the right ones. This tool separates what the head can learn from how training reached it: it loads a checkpoint's
student, freezes the encoder and the segmentation decoder, optionally re-initialises the confidence branch
(:meth:`scripts.networks.CEDSNet.reset_confidence_branch`), and trains only the branch with the bundle's
:class:`scripts.losses.ConfidenceCELoss` on labelled training patches (``train#deterministic_transforms``, then
``RandCropByPosNegLabeld`` with the config's ``roi_size``, ``pos_samples``, ``neg_samples`` and ``num_samples``, two
volumes per batch), the network in training mode as in training. Before the first step and every ``every`` steps it
scores the branch on fixed patches of the training and validation volumes, drawn as the unlabelled stream draws them
(no label-guided sampling), with dropout off: AUROC within predicted tumour of the head's P(correct) and, the
reference, of the network's own top softmax probability (which stays the same: the segmentation is frozen), the
head's mean P(correct) over the right and over the wrong voxels of predicted tumour, and the median pre-activation of
the two hidden units of the head's output transition in predicted tumour and background, with the ELU's slope there
(a unit far below 0 outputs about -1 whatever its input and passes back almost no gradient).

Usage (data of the benchmark's ``cpu`` profile):
    python scripts/ceds_head_fit.py --checkpoint <models/checkpoint.pt> \
        --datalist outputs/benchmarks/cpu/data/ceds_mediastinum/datalist_10.json [--fresh] \
        [--balance predicted_class] [--optimizer sgd] [--learning_rate 0.01] [--iterations 300] [--out fit.json]
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import numpy as np
import torch

from bundle_imports import bundle_module, use_bundle
from ceds_mask_audit import BINS, histogram_auroc, load_network

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ceds_mediastinum"


def _scores(net: torch.nn.Module, patches: list[tuple[torch.Tensor, torch.Tensor]], frozen_norms: object) -> dict:
    """AUROC (head, probability) and the head's mean P(correct) (right, wrong) within predicted tumour, and the
    median pre-activation of each hidden unit of the head's output transition (``confidence_out``: convolution and
    batch norm, then ELU) in predicted tumour and in predicted background. The network is in training mode (batch
    statistics) with dropout off, so that a frozen segmentation scores the same each time; ``frozen_norms`` is
    :func:`scripts.semi_supervised.frozen_norm_statistics`."""
    hist = {s: {"correct": np.zeros(BINS, np.int64), "wrong": np.zeros(BINS, np.int64)} for s in ("head", "prob")}
    sums = {"right": [0.0, 0], "wrong": [0.0, 0]}
    hidden: dict[str, list[torch.Tensor]] = {"tumour": [], "background": []}
    captured = {}
    # the ELU after it works in place: keep a copy of the batch-normalised convolution's output
    hook = net.confidence_out.conv_block.register_forward_hook(
        lambda module, args, output: captured.__setitem__("z", output.detach().clone()))
    dropouts = [m for m in net.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    for m in dropouts:
        m.eval()
    with torch.no_grad(), frozen_norms(net):
        for image, label in patches:
            seg, confidence = net.forward_with_confidence(image)
            predicted = seg.argmax(1, keepdim=True) == 1
            right, wrong = predicted & (label > 0.5), predicted & (label <= 0.5)
            units = captured["z"].transpose(0, 1)  # [units, B, *spatial]
            hidden["tumour"].append(units[:, predicted[:, 0]])
            hidden["background"].append(units[:, ~predicted[:, 0]])
            head = torch.softmax(confidence, 1)[:, 1:2]
            for name, value in (("head", head), ("prob", torch.softmax(seg, 1).amax(1, keepdim=True))):
                bins = (value.clamp(0, 1 - 1e-7) * BINS).long()
                hist[name]["correct"] += np.bincount(bins[right].numpy(), minlength=BINS)
                hist[name]["wrong"] += np.bincount(bins[wrong].numpy(), minlength=BINS)
            for key, voxels in (("right", right), ("wrong", wrong)):
                sums[key][0] += float(head[voxels].sum())
                sums[key][1] += int(voxels.sum())
    for m in dropouts:
        m.train()
    hook.remove()
    medians = {where: torch.cat(z, 1).median(1).values.tolist() if sum(t.shape[1] for t in z) else None
               for where, z in hidden.items()}
    return {
        "auroc_head": histogram_auroc(**hist["head"]),
        "auroc_probability": histogram_auroc(**hist["prob"]),
        "mean_head": {k: s / n if n else None for k, (s, n) in sums.items()},
        "predicted_tumour_voxels": sums["right"][1] + sums["wrong"][1],
        "hidden_median": medians,
        "elu_slope_at_median": {where: [min(1.0, float(np.exp(v))) for v in m] if m else None
                                for where, m in medians.items()},
    }


def main(checkpoint: str, datalist: str, fresh: bool = False, balance: str = "predicted_class",
         optimizer: str = "sgd", learning_rate: float | None = None, iterations: int = 300, every: int = 100,
         eval_batches: int = 10, seed: int = 0,
         overlay: str | None = "configs/cpu_demo.json", weights: str = "model", out: str | None = None) -> None:
    """Train the confidence branch of ``checkpoint`` alone and print its scores along the way.

    Args:
        checkpoint: a training checkpoint (``models/checkpoint.pt``; ``model.pt`` holds the same weights).
        datalist: the run's datalist (its ``training`` split gives the labelled patches, its ``validation`` split
            the held-out ones).
        fresh: re-initialise the confidence branch first (``False``: go on from the checkpoint's branch).
        balance: ``ConfidenceCELoss`` balance, ``"batch"`` (the authors) or ``"predicted_class"``.
        optimizer: ``"sgd"`` (the config's momentum and weight decay) or ``"adam"``.
        learning_rate: the (constant) learning rate; default: the config's ``learning_rate`` for SGD, 1e-3 for Adam.
        iterations: training steps.
        every: score every ``every`` steps (and before the first).
        eval_batches: batches of fixed patches scored per split (two volumes, ``num_samples`` patches each).
        seed: seed of the patches and of a fresh branch.
        overlay: a config overlay relative to the bundle (``None``: the bundle's defaults).
        weights: the checkpoint entry loaded: ``"model"`` (the student) or ``"ema"`` (the teacher).
        out: optional JSON file for the result.

    Prints each scoring as it comes and writes to ``out`` the settings and ``curve``: one entry per scoring with
    ``iteration``, ``loss`` (mean over the steps since the last scoring) and the scores of ``training`` and
    ``validation`` (see the module docstring).
    """
    from monai.transforms import Compose, RandCropByPosNegLabeld, RandSpatialCropSamplesd
    from monai.utils import set_determinism

    use_bundle(BUNDLE)
    load_datalist = bundle_module(BUNDLE, "datalist").load_datalist
    losses = bundle_module(BUNDLE, "losses")
    frozen_norms = bundle_module(BUNDLE, "semi_supervised").frozen_norm_statistics
    parser, net = load_network(checkpoint, weights, overlay)
    set_determinism(seed)
    if fresh:
        net.reset_confidence_branch()
    net.train()
    for parameter in net.segmentation_parameters():
        parameter.requires_grad_(False)
    params = net.confidence_parameters()
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=learning_rate or parser.get_parsed_content("learning_rate"),
                              momentum=parser.get_parsed_content("momentum"),
                              weight_decay=parser.get_parsed_content("weight_decay"))
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=learning_rate or 1e-3)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
    loss_function = losses.ConfidenceCELoss(balance)

    load = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    roi, samples = parser.get_parsed_content("roi_size"), parser.get_parsed_content("num_samples")
    volumes = {split: [load({"image": r["image"], "label": r["label"]}) for r in load_datalist(datalist, split)]
               for split in ("training", "validation")}
    rng = np.random.default_rng(seed)

    def draw(split: str, crop: object) -> tuple[torch.Tensor, torch.Tensor]:
        pool = volumes[split]
        patches = [p for i in rng.choice(len(pool), min(2, len(pool)), replace=False) for p in crop(pool[i])]
        return (torch.stack([p["image"].as_tensor() for p in patches]),
                torch.stack([p["label"].as_tensor() for p in patches]))

    uniform = RandSpatialCropSamplesd(["image", "label"], roi, samples, random_size=False).set_random_state(seed)
    fixed = {split: [draw(split, uniform) for _ in range(eval_batches)] for split in volumes}
    guided = RandCropByPosNegLabeld(["image", "label"], "label", roi, pos=parser.get_parsed_content("pos_samples"),
                                    neg=parser.get_parsed_content("neg_samples"),
                                    num_samples=samples).set_random_state(seed + 1)

    curve, recent = [], []
    for step in range(iterations + 1):
        if step % every == 0 or step == iterations:
            entry = {"iteration": step, "loss": float(np.mean(recent)) if recent else None,
                     **{split: _scores(net, fixed[split], frozen_norms) for split in fixed}}
            curve.append(entry)
            recent = []
            print(json.dumps(entry), flush=True)
        if step == iterations:
            break
        image, label = draw("training", guided)
        seg, confidence = net.forward_with_confidence(image)
        loss = loss_function(confidence, seg, label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent.append(float(loss.detach()))

    result = {"checkpoint": checkpoint, "weights": weights, "datalist": datalist, "fresh": fresh, "balance": balance,
              "optimizer": optimizer, "learning_rate": learning_rate, "iterations": iterations, "seed": seed,
              "curve": curve}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    fire.Fire(main)
