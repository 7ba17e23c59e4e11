"""scripts/qc_threshold.py: Dice, the Youden threshold, and a choice made from real batch-inference runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import qc_threshold
from conftest import BUNDLES
from test_batch_infer import CT, OVERLAY, _random_checkpoint


def test_dice():
    a = np.zeros((4, 4), np.uint8)
    b = np.zeros((4, 4), np.uint8)
    assert np.isnan(qc_threshold.dice(a, b))
    a[:2], b[1:3] = 1, 1
    assert qc_threshold.dice(a, b) == pytest.approx(0.5)
    assert qc_threshold.dice(a, np.zeros_like(a)) == 0.0


def test_youden_threshold_separates_poor_cases():
    doubt = [0.10, 0.20, 0.25, 0.40, 0.50, 0.60]
    best = qc_threshold.youden_threshold(doubt, [False, False, False, True, True, True])
    assert 0.25 < best["threshold"] < 0.40
    assert best["youden_j"] == pytest.approx(1.0) and best["sensitivity"] == best["specificity"] == 1.0
    # one good case above the poor ones: the best cut still flags all poor cases and costs one false alarm
    best = qc_threshold.youden_threshold(doubt + [0.9], [False, False, False, True, True, True, False])
    assert 0.25 < best["threshold"] < 0.40 and best["specificity"] == pytest.approx(0.75)
    # a doubt that does not separate poor from good cases flags nothing
    useless = qc_threshold.youden_threshold([0.2, 0.2, 0.2, 0.2], [True, False, True, False])
    assert useless["youden_j"] == 0 and useless["threshold"] == pytest.approx(0.2) and useless["sensitivity"] == 0
    with pytest.raises(ValueError, match="poor and good"):
        qc_threshold.youden_threshold(doubt, [True] * 6)


@pytest.mark.integration
def test_choose_from_batch_inference(ct_data, tmp_path):
    """Two cases get their own prediction as label (Dice 1, good), two an empty label (Dice 0, poor)."""
    import batch_infer
    import nibabel as nib

    model = _random_checkpoint(CT, tmp_path / "ct.pt")
    records = json.loads((ct_data / "datalist_100.json").read_text())["training"][:4]
    records = [{"image": str(ct_data / r["image"]), "label": str(ct_data / r["label"])} for r in records]
    out = tmp_path / "qc"
    bundle = str(BUNDLES / CT)
    options = batch_infer.BatchOptions(str(model), OVERLAY, split="training", device="cpu", progress=False)
    first = batch_infer.run_batch(bundle, _datalist(tmp_path, records), str(out / "0"), options)
    for i, (record, row) in enumerate(zip(records, first["cases"])):
        seg = out / "0" / row["case"] / row["outputs"]["seg"]
        if i < 2:
            record["label"] = str(seg)
        else:
            empty = nib.load(seg)
            record["label"] = str(tmp_path / f"empty_{i}.nii.gz")
            nib.save(nib.Nifti1Image(np.zeros(empty.shape, np.uint8), empty.affine), record["label"])
    kwargs = dict(bundle=bundle, checkpoints=[str(model)], datalist=_datalist(tmp_path, records), out_dir=str(out),
                  overlay=OVERLAY, split="training")
    result = qc_threshold.choose(**kwargs)  # reuses the finished cases of out/0
    assert [round(r["dice"], 6) for r in result["cases"]] == [1.0, 1.0, 0.0, 0.0]
    assert json.loads((out / "qc_threshold.json").read_text()) == result
    assert result["n_cases"] == 4 and result["n_poor"] == 2
    doubt = [r["mean_doubt_in_mask"] for r in result["cases"]]
    best = qc_threshold.youden_threshold(doubt, [False, False, True, True])
    assert result["threshold"] == pytest.approx(best["threshold"])
    with pytest.raises(ValueError, match="test split"):
        qc_threshold.choose(**{**kwargs, "split": "test"})


def _datalist(folder: Path, records: list[dict]) -> str:
    path = folder / "list.json"
    path.write_text(json.dumps({"training": records}))
    return str(path)
