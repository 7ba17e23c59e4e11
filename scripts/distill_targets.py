"""What the liver student's Dirichlet KL to the contrast-enhanced teacher asks of it on unlabelled volumes.

``CdUgJLLoss``'s ``distill_kl`` term is ``KL(Dir(alpha_teacher) || Dir(alpha_student))`` per voxel. A Dirichlet
carries a class (its mean ``p = alpha / S``) and an amount of evidence (its strength ``S``); the KL asks the student
to match both. This script runs a teacher checkpoint (on the CE phases) and a student checkpoint (on T2WI + DWI)
over the unlabelled records of a phantom datalist, preprocessed as in the bundle's inference, and reports per voxel
the mean Dirichlet KL beside the KL of the class probabilities alone, ``sum_k p_t log(p_t / p_s)`` (what
distillation of the teacher's classes would cost), and the median strengths.

It also counts where the teacher and the student are right or wrong against the phantom's label (read from
``labelsTr`` only to score), i.e. how many voxels the KL could teach and how many it would mislead.

Usage:
    python scripts/distill_targets.py --teacher <models/teacher/model.pt> --student <models/model.pt> \
        --datalist <datalist_10.json> [--cases 12] [--out targets.json]
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import torch

from bundle_imports import bundle_module
from liver_errors import load_network, unlabelled_volumes

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cdugjl_liver"


def main(teacher: str, student: str, datalist: str, cases: int = 12, overlay: str | None = "configs/cpu_demo.json",
         out: str | None = None) -> None:
    """Mean Dirichlet and class-probability KL per voxel, median strengths, and the teacher's and student's errors.

    Args:
        teacher: the CE teacher's ``model.pt`` (or a training checkpoint holding it under ``"model"``).
        student: a student's ``model.pt`` (T2WI + DWI).
        datalist: a phantom datalist whose ``unlabeled`` records have ``case``, ``image`` and ``ce``, with the
            phantom's ``labelsTr/<case>.nii.gz`` beside its ``imagesTr``.
        cases: the first this many unlabelled records are read.
        overlay: a config overlay relative to the bundle (``None``: the bundle's defaults).
        out: optional JSON file for the result.

    Returns:
        None. Prints the figures; ``out`` gets ``{"kl": {"dirichlet", "class"}`` (means per voxel), ``"strength":
        {"teacher", "student"}`` (median ``S``), ``"saturated": {"teacher", "student"}`` (fraction of voxels whose
        largest logit reaches the evidence clamp), ``"voxels": {"both_right", "teacher_right_only",
        "student_right_only", "both_wrong"}``, ``"tumour_voxels"``, ``"settings"}``.
    """
    t_net, t_inferer, pixdim, ce_key = load_network(teacher, overlay, teacher=True)
    s_net, s_inferer, _, image_key = load_network(student, overlay)
    dirichlet_kl = bundle_module(BUNDLE, "distillation").dirichlet_kl
    sums = {"dirichlet": 0.0, "class": 0.0}
    saturated = {"teacher": 0, "student": 0}
    ceiling = {name: torch.exp(torch.tensor(net.dirichlet.clamp, dtype=torch.float64)) * 0.999
               for name, net in (("teacher", t_net), ("student", s_net))}
    counts = {"both_right": 0, "teacher_right_only": 0, "student_right_only": 0, "both_wrong": 0}
    strengths: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    voxels = tumour = 0
    read = 0
    for read, data in enumerate(unlabelled_volumes(datalist, [ce_key, image_key], pixdim, cases), 1):
        with torch.no_grad():
            alpha_t = t_inferer(data[ce_key][None], t_net).as_tensor().double()  # [1, K, H, W, D]
            alpha_s = s_inferer(data[image_key][None], s_net).as_tensor().double()
        s_t, s_s = alpha_t.sum(1, keepdim=True), alpha_s.sum(1, keepdim=True)
        p_t, p_s = alpha_t / s_t, alpha_s / s_s
        sums["dirichlet"] += float(dirichlet_kl(alpha_t, alpha_s).sum())
        sums["class"] += float((p_t * (p_t.log() - p_s.log())).sum())
        saturated["teacher"] += int((alpha_t.amax(1) - 1 >= ceiling["teacher"]).sum())
        saturated["student"] += int((alpha_s.amax(1) - 1 >= ceiling["student"]).sum())
        truth = data["label"][0] > 0.5
        t_right = (alpha_t.argmax(1)[0] > 0) == truth
        s_right = (alpha_s.argmax(1)[0] > 0) == truth
        counts["both_right"] += int((t_right & s_right).sum())
        counts["teacher_right_only"] += int((t_right & ~s_right).sum())
        counts["student_right_only"] += int((~t_right & s_right).sum())
        counts["both_wrong"] += int((~t_right & ~s_right).sum())
        strengths["teacher"].append(s_t.flatten().float())
        strengths["student"].append(s_s.flatten().float())
        voxels += truth.numel()
        tumour += int(truth.sum())
    result = {
        "kl": {k: v / voxels for k, v in sums.items()},
        "strength": {k: float(torch.cat(v).median()) for k, v in strengths.items()},
        "saturated": {k: v / voxels for k, v in saturated.items()},
        "voxels": counts,
        "tumour_voxels": tumour,
        "settings": {"teacher": teacher, "student": student, "datalist": datalist, "cases": read},
    }
    kl = result["kl"]
    print(f"mean KL per voxel: Dirichlet {kl['dirichlet']:.4f}, class probabilities {kl['class']:.6f}")
    print(f"median strength S: teacher {result['strength']['teacher']:.1f}, "
          f"student {result['strength']['student']:.1f}; "
          f"at the evidence clamp: teacher {result['saturated']['teacher']:.3f}, "
          f"student {result['saturated']['student']:.3f} of the voxels")
    print(f"voxels ({voxels}, {tumour} tumour): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    fire.Fire(main)
