"""Batch inference over many cases: atomic per-case outputs, reruns, failures recorded, QC, PNG, safe loading."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import batch_infer
from batch_infer import BatchOptions
from bundle_imports import use_bundle
from conftest import BUNDLES, REPO, torchrun

CT, LIVER = "ceds_mediastinum", "cdugjl_liver"
OVERLAY = "configs/cpu_demo.json"


class NotATensor:
    """A non-tensor object a malicious checkpoint could carry (unpickling it runs arbitrary code paths)."""


def _random_checkpoint(bundle: str, path: Path, extra: object | None = None) -> Path:
    """Save a random-init ``network_def`` (cpu_demo widths) state dict, as ``models/model.pt`` holds it."""
    from monai.bundle import ConfigParser

    use_bundle(bundle)
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / "inference.json"), str(BUNDLES / bundle / OVERLAY)])
    parser["bundle_root"] = str(BUNDLES / bundle)
    torch.manual_seed(0)
    state = parser.get_parsed_content("network_def").state_dict()
    torch.save(state if extra is None else {**state, "extra": extra}, path)
    return path


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory) -> Path:
    return _random_checkpoint(CT, tmp_path_factory.mktemp("ckpt") / "ct.pt")


@pytest.fixture(scope="module")
def liver_model(tmp_path_factory) -> Path:
    return _random_checkpoint(LIVER, tmp_path_factory.mktemp("ckpt") / "liver.pt")


def _summary(out: Path) -> dict[str, dict]:
    rows = {r["case"]: r for r in json.loads((out / "run_summary.json").read_text())["cases"]}
    with open(out / "run_summary.csv", newline="") as f:
        assert [r["case"] for r in csv.DictReader(f)] == list(rows)
    return rows


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_quality_check():
    mask = np.zeros((8, 8, 4), np.uint8)
    assert batch_infer.quality_check(mask, None, 0.5)["reason"].startswith("empty mask")
    mask[2:4, 2:4, 1] = 1
    doubt = np.full(mask.shape, 0.9, np.float32)
    doubt[mask > 0] = 0.2
    ok = batch_infer.quality_check(mask, doubt, 0.5)
    assert not ok["needs_review"] and ok["tumour_voxels"] == 4 and ok["mean_doubt_in_mask"] == pytest.approx(0.2)
    doubt[2, 2, 1] = 1.0
    flagged = batch_infer.quality_check(mask, doubt, 0.3)
    assert flagged["needs_review"] and "0.400" in flagged["reason"]
    assert not batch_infer.quality_check(mask, None, 0.5)["needs_review"]
    # no threshold (CEDS's default): only an empty mask needs review, the mean doubt is still recorded
    unflagged = batch_infer.quality_check(mask, doubt, None)
    assert not unflagged["needs_review"] and unflagged["mean_doubt_in_mask"] == pytest.approx(0.4)
    # a quantification value that contradicts the mask (the liver report's "implausible" sentences)
    odd = batch_infer.quality_check(mask, doubt, None, ["slice 1: a", "slice 2: b"])
    assert odd["needs_review"] and odd["reason"] == "implausible quantification: slice 1: a (and 1 more)"
    # each bundle's default lives in its metadata.json; the run resolves it there
    defaults = {b: batch_infer.with_bundle_defaults(batch_infer.BatchOptions(), json.loads(
        (BUNDLES / b / "configs" / "metadata.json").read_text())) for b in (CT, LIVER)}
    assert (defaults[LIVER].qc_threshold, defaults[CT].qc_threshold) == (0.214, None)
    assert (defaults[LIVER].modality_suffixes, defaults[CT].modality_suffixes) == (("_t2w", "_dwi"), ())
    # and which output is the doubt map (tools read it there instead of branching on the bundle's name)
    metas = {b: json.loads((BUNDLES / b / "configs" / "metadata.json").read_text()) for b in (CT, LIVER)}
    assert batch_infer.doubt_map(metas[LIVER]) == ("uncertainty", False)
    assert batch_infer.doubt_map(metas[CT]) == ("confidence", True)
    assert batch_infer.doubt_map({}) is None


def test_inference_names_cases_with_the_suffixes_of_its_metadata():
    """The bundle's outputs (inference.json) and batch_infer's case list (metadata.json) strip the same suffixes."""
    for bundle in (CT, LIVER):
        configs = BUNDLES / bundle / "configs"
        meta = json.loads((configs / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
        inference = json.loads((configs / "inference.json").read_text())
        assert inference["modality_suffixes"] == meta.get("channel_file_suffixes", [])
        assert len(inference["modality_suffixes"]) in (0, meta["num_channels"])


def test_overview_png_through_largest_lesion(tmp_path):
    mask = np.zeros((32, 32, 10), np.uint8)
    mask[2:4, 2:4, 1] = 1  # small lesion
    mask[10:20, 10:20, 6:9] = 1  # largest lesion, centre slice 7
    image = np.random.default_rng(0).normal(size=mask.shape)
    path = tmp_path / "case.png"
    assert batch_infer.save_overview(image, mask, mask * 0.3, str(path), "case") == 7
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_loading_is_weights_only():
    """Every ``torch.load`` in the bundles and repo scripts passes ``weights_only=True``; the configs load through
    MONAI's ``CheckpointLoader`` (or the bundles' subclass of it, which adds only an error message), which does too."""
    import inspect

    from monai.handlers import CheckpointLoader

    sources = [*BUNDLES.glob("*/scripts/*.py"), *(REPO / "scripts").glob("*.py")]
    for source in sources:
        for call in re.findall(r"torch\.load\(([^)]*)\)", source.read_text()):
            assert "weights_only=True" in call, f"{source}: torch.load({call}) without weights_only=True"
    for config in BUNDLES.glob("*/configs/*.json"):
        for target in re.findall(r'"_target_":\s*"([^"]*CheckpointLoader[^"]*)"', config.read_text()):
            assert target in ("CheckpointLoader", "monai.handlers.CheckpointLoader",
                              "scripts.architecture.ArchitectureCheckpointLoader"), f"{config}: {target}"
    assert "weights_only=True" in inspect.getsource(CheckpointLoader.__call__)
    for bundle in BUNDLES.iterdir():
        subclass = (bundle / "scripts" / "architecture.py").read_text()
        assert ("class ArchitectureCheckpointLoader(CheckpointLoader)" in subclass
                and "super().__call__(engine)" in subclass)


@pytest.mark.integration
def test_ct_folder_run_rerun_and_bad_cases(ct_data, ct_model, tmp_path):
    """Good cases are written whole (with PNG and done.json), bad ones are recorded with the file and the problem
    and do not stop the others, the exit code is 1, and a rerun skips the finished cases."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in ("ct_000", "ct_001"):
        shutil.copy(ct_data / "imagesTr" / f"{case}.nii.gz", inputs)
    cut = (ct_data / "imagesTr" / "ct_002.nii.gz").read_bytes()
    (inputs / "ct_cut.nii.gz").write_bytes(cut[: len(cut) // 2])
    nan = nib.load(str(ct_data / "imagesTr" / "ct_003.nii.gz"))
    data = np.asarray(nan.dataobj, dtype=np.float32)
    data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, nan.affine), str(inputs / "ct_nan.nii.gz"))
    out = tmp_path / "out"
    args = dict(bundle=str(BUNDLES / CT), inputs=str(inputs), out_dir=str(out), checkpoint=str(ct_model),
                overlay=OVERLAY, device="cpu", png=True, qc_threshold=0.99)
    with pytest.raises(SystemExit) as exit_info:
        batch_infer.main(**args)
    assert exit_info.value.code == 1
    rows = _summary(out)
    assert {c: r["status"] for c, r in rows.items()} == {"ct_000": "done", "ct_001": "done", "ct_cut": "invalid",
                                                         "ct_nan": "invalid"}
    assert "ct_cut.nii.gz: corrupt or truncated" in rows["ct_cut"]["reason"]
    assert "ct_nan.nii.gz: 1 NaN voxel" in rows["ct_nan"]["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["ct_000", "ct_001", "run_summary.csv", "run_summary.json"]
    for case in ("ct_000", "ct_001"):
        done = json.loads((out / case / "done.json").read_text())
        assert set(done["outputs"]) == {"seg", "confidence", "overview"}
        assert sorted(os.listdir(out / case)) == sorted([*done["outputs"].values(), "done.json"])
        seg = nib.load(str(out / case / f"{case}_seg.nii.gz"))
        assert seg.shape == nib.load(str(inputs / f"{case}.nii.gz")).shape
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
        assert done["qc"]["needs_review"] == (done["qc"]["tumour_voxels"] == 0)  # threshold 0.99: only empty masks
    stamp = (out / "ct_000" / "done.json").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        batch_infer.main(**args)
    rows = _summary(out)
    assert rows["ct_000"]["status"] == rows["ct_001"]["status"] == "skipped"
    assert (out / "ct_000" / "done.json").stat().st_mtime_ns == stamp


@pytest.mark.integration
def test_provenance_recorded_and_another_checkpoint_recomputes(ct_data, ct_model, tmp_path):
    """done.json and the summary name what made the outputs; a rerun with other weights or overrides recomputes
    instead of skipping, and says why."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(ct_data / "imagesTr" / "ct_000.nii.gz", inputs)
    out = tmp_path / "out"
    options = BatchOptions(checkpoint=str(ct_model), overlay=OVERLAY, device="cpu", progress=False)
    args = (str(BUNDLES / CT), str(inputs), str(out))
    first = batch_infer.run_batch(*args, options)
    made_by = json.loads((out / "ct_000" / "done.json").read_text())["provenance"]
    meta = json.loads((BUNDLES / CT / "configs" / "metadata.json").read_text())
    assert made_by == first["provenance"] == {
        "bundle": CT, "bundle_version": meta["version"], "checkpoint": str(ct_model.resolve()),
        "checkpoint_sha256": hashlib.sha256(ct_model.read_bytes()).hexdigest(), "overlays": [OVERLAY], "override": {}}
    assert batch_infer.run_batch(*args, options)["cases"][0]["status"] == "skipped"

    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save({k: torch.randn_like(v) if v.is_floating_point() else v
                for k, v in torch.load(ct_model, weights_only=True).items()}, other)
    again = batch_infer.run_batch(*args, replace(options, checkpoint=str(other)))
    row = again["cases"][0]
    assert row["status"] == "done" and "checkpoint" in row["reason"] and "checkpoint_sha256" in row["reason"]
    done = json.loads((out / "ct_000" / "done.json").read_text())
    assert done["provenance"]["checkpoint_sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    # an override is part of the provenance too
    changed = batch_infer.run_batch(*args, replace(options, checkpoint=str(other), override={"sw_batch_size": 1}))
    assert changed["cases"][0]["status"] == "done" and "override" in changed["cases"][0]["reason"]


def test_each_bundle_refuses_the_other_modality(ct_data, liver_data, ct_model, liver_model, tmp_path):
    """A CT given to the MRI bundle (as T2WI and DWI) and an MR given to the CT bundle are invalid before any
    compute, with a reason a person understands."""
    ct = str(ct_data / "imagesTr" / "ct_000.nii.gz")
    mr = str(liver_data / "imagesTr" / "liver_000_t2w.nii.gz")
    cases = {LIVER: ({"case": "ct_as_mr", "image": [ct, ct]}, liver_model, "looks like a CT in Hounsfield units"),
             CT: ({"case": "mr_as_ct", "image": mr}, ct_model, "does not look like a CT in Hounsfield units")}
    for bundle, (record, model, reason) in cases.items():
        listing = tmp_path / f"{bundle}.json"
        listing.write_text(json.dumps([record]))
        out = tmp_path / bundle
        summary = batch_infer.run_batch(str(BUNDLES / bundle), str(listing), str(out),
                                        BatchOptions(checkpoint=str(model), overlay=OVERLAY, device="cpu",
                                                     progress=False))
        row = summary["cases"][0]
        assert row["status"] == "invalid" and reason in row["reason"], row
        assert summary["counts"]["invalid"] == 1 and not (out / record["case"]).exists()


@pytest.mark.parametrize("bundle", [CT, LIVER])
def test_bundle_inference_refuses_the_other_modality(bundle, ct_data, liver_data, ct_model, liver_model, tmp_path):
    """The same rule inside each bundle's ``inference.json`` (the route of ``python -m monai.bundle run`` and MONAI
    Label, which skip batch_infer's checks): the run stops with the file and the problem, and writes no mask."""
    from monai.bundle import ConfigWorkflow

    ct = str(ct_data / "imagesTr" / "ct_000.nii.gz")
    mr = str(liver_data / "imagesTr" / "liver_000_t2w.nii.gz")
    record, model, reason = {
        LIVER: ({"image": [ct, ct]}, liver_model, f"{ct}, channel 0 (T2WI): looks like a CT in Hounsfield units"),
        CT: ({"image": mr}, ct_model, f"{mr}: does not look like a CT in Hounsfield units"),
    }[bundle]
    use_bundle(bundle)
    workflow = ConfigWorkflow(
        config_file=[str(BUNDLES / bundle / "configs" / "inference.json"), str(BUNDLES / bundle / OVERLAY)],
        workflow_type="infer", bundle_root=str(BUNDLES / bundle), checkpoint=str(model), data=[record],
        output_dir=str(tmp_path / "eval"), device="cpu", num_workers=0)
    workflow.initialize()
    with pytest.raises(Exception) as error:
        workflow.run()
    assert reason in "".join(traceback.format_exception(error.value))
    assert not list(tmp_path.rglob("*.nii.gz"))


@pytest.mark.integration
def test_failing_case_leaves_nothing_half_written(ct_data, ct_model, tmp_path, monkeypatch):
    """A case failing after the bundle wrote its files, or inside the bundle's workflow, leaves no case folder,
    staging or partial folder behind, and the next case runs."""
    real = batch_infer.quality_check

    def fail_on_second(*args):
        fail_on_second.calls += 1
        if fail_on_second.calls == 2:
            raise RuntimeError("disk full (simulated)")
        return real(*args)

    fail_on_second.calls = 0
    monkeypatch.setattr(batch_infer, "quality_check", fail_on_second)
    real_check = batch_infer.check_case
    monkeypatch.setattr(batch_infer, "check_case", lambda r, **k: None if r["case"] == "ghost" else real_check(r, **k))
    cases = ["ct_000", "ct_001", "ghost", "ct_002"]  # ct_001 fails after its files are written, ghost in the engine
    datalist = tmp_path / "cases.json"
    datalist.write_text(json.dumps([{"case": c, "image": str(ct_data / "imagesTr" / f"{c}.nii.gz")} for c in cases]))
    out = tmp_path / "out"
    summary = batch_infer.run_batch(str(BUNDLES / CT), str(datalist), str(out),
                                    BatchOptions(str(ct_model), OVERLAY, device="cpu", progress=False))
    assert [r["status"] for r in summary["cases"]] == ["done", "failed", "failed", "done"]
    assert summary["cases"][1]["reason"] == "RuntimeError: disk full (simulated)"
    assert "ghost.nii.gz" in summary["cases"][2]["reason"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["ct_000", "ct_002"] and _leftovers(out) == []


@pytest.mark.integration
def test_liver_datalist_with_separate_and_4d_inputs(liver_data, liver_model, tmp_path):
    """The liver bundle takes ``[t2w, dwi]`` records and one 4D file; mask, uncertainty, quantification and PNG."""
    record = json.loads((liver_data / "datalist_100.json").read_text())["test"][0]
    t2w, dwi = (nib.load(str(liver_data / p)) for p in record["image"])
    stacked = np.stack([np.asarray(t2w.dataobj), np.asarray(dwi.dataobj)], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(stacked, t2w.affine), str(tmp_path / "stacked.nii.gz"))
    datalist = tmp_path / "cases.json"
    datalist.write_text(json.dumps({"test": [{"image": [str(liver_data / p) for p in record["image"]]},
                                             {"case": "stacked", "image": "stacked.nii.gz"}]}))
    out = tmp_path / "out"
    summary = batch_infer.run_batch(str(BUNDLES / LIVER), str(datalist), str(out),
                                    BatchOptions(str(liver_model), OVERLAY, device="cpu", png=True, progress=False))
    name = record["case"]
    assert [(r["case"], r["status"]) for r in summary["cases"]] == [(name, "done"), ("stacked", "done")]
    for case in (name, "stacked"):
        done = json.loads((out / case / "done.json").read_text())
        assert set(done["outputs"]) == {"seg", "uncertainty", "quantification", "overview"}
        assert json.loads((out / case / f"{case}_quantification.json").read_text())["geometry"]
        uncertainty = np.asarray(nib.load(str(out / case / f"{case}_uncertainty.nii.gz")).dataobj)
        assert uncertainty.shape == t2w.shape and 0 <= uncertainty.min() and uncertainty.max() <= 1
        assert isinstance(done["qc"]["needs_review"], bool)


@pytest.mark.integration
def test_volume_larger_than_roi_streams_through_sliding_window(tmp_path, ct_model):
    """A volume several windows large runs window by window (sw_batch_size 1, stitching on the CPU)."""
    import phantoms

    phantoms.mediastinal_ct(str(tmp_path / "big"), n_cases=1, seed=1, size=128, n_slices=96)
    image = next((tmp_path / "big" / "imagesTr").glob("*.nii.gz"))
    out = tmp_path / "out"
    options = BatchOptions(str(ct_model), OVERLAY, device="cpu", sw_batch_size=1, override={"inferer#device": "cpu"})
    runner = batch_infer.BundleRunner(BUNDLES / CT, out, {"image": str(image)}, options)
    inferer = runner.workflow.parser.get_parsed_content("inferer")
    assert type(inferer).__name__ == "SlidingWindowInferer" and inferer.sw_batch_size == 1
    header = nib.load(str(image))
    pixdim = np.array(runner.workflow.parser["pixdim"])
    resampled = np.array(header.shape) * np.array(header.header.get_zooms()) / pixdim
    assert np.prod(resampled) > 4 * np.prod(inferer.roi_size), "the test volume should need several windows"
    runner({"image": str(image)})
    seg = next(out.glob("*/*_seg.nii.gz"))
    assert nib.load(str(seg)).shape == header.shape


@pytest.mark.integration
@pytest.mark.parametrize("bundle", [CT, LIVER])
def test_checkpoint_with_non_tensor_objects_is_refused(bundle, ct_data, liver_data, tmp_path):
    """A checkpoint that pickles an arbitrary object is refused by the bundle's own loading path."""
    evil = _random_checkpoint(bundle, tmp_path / "evil.pt", extra=NotATensor())
    data = ct_data if bundle == CT else liver_data
    datalist = str(data / "datalist_100.json")
    out = tmp_path / "out"
    try:
        summary = batch_infer.run_batch(str(BUNDLES / bundle), datalist, str(out),
                                        BatchOptions(str(evil), OVERLAY, device="cpu", progress=False))
        reasons = [r["reason"] for r in summary["cases"]]
    except batch_infer.WorkflowError as e:  # the CT bundle loads its checkpoint while the workflow is built
        reasons = [str(e)]
    assert reasons and all(re.search("Weights only load failed|UnpicklingError", r) for r in reasons), reasons
    assert all("NotATensor" in r for r in reasons), reasons
    assert [p.name for p in out.iterdir() if p.is_dir()] == []


@pytest.mark.integration
def test_cli_exit_codes(ct_data, ct_model, tmp_path):
    """The fire CLI: 0 when every case is done, 2 (with the file and problem) for an empty case list."""
    script = str(REPO / "scripts" / "batch_infer.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base = [sys.executable, script, "--bundle", str(BUNDLES / CT), "--checkpoint", str(ct_model),
            "--overlay", OVERLAY, "--device", "cpu"]
    ok = subprocess.run([*base, "--inputs", str(ct_data / "datalist_100.json"), "--out_dir", str(tmp_path / "a")],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads((tmp_path / "a" / "run_summary.json").read_text())["counts"]["done"] >= 1
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"test": []}))
    bad = subprocess.run([*base, "--inputs", str(empty), "--out_dir", str(tmp_path / "b")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and f"{empty}: no cases found" in bad.stderr
    assert not (tmp_path / "b").exists()


def test_shards_are_disjoint_and_cover_every_case():
    records = [{"case": f"c{i}"} for i in range(7)]
    shares = [batch_infer.Shard(rank, 3).take(records) for rank in range(3)]
    assert sorted(r["case"] for share in shares for r in share) == sorted(r["case"] for r in records)
    assert shares[1] == [records[1], records[4]]
    assert batch_infer.Shard().take(records) == records and batch_infer.Shard().staging == ".staging"


@pytest.mark.integration
def test_torchrun_shards_cases_and_merges_one_summary(ct_data, ct_model, tmp_path):
    """``torchrun --nproc_per_node=2 scripts/batch_infer.py``: each rank runs its own share of the cases (one bad case
    among them), rank 0 writes one summary with every case once in the input order, nothing per rank is left
    behind, both ranks exit with the run's code, and a single-process rerun skips every finished case."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in ("ct_000", "ct_001", "ct_002", "ct_003"):
        shutil.copy(ct_data / "imagesTr" / f"{case}.nii.gz", inputs)
    cut = (ct_data / "imagesTr" / "ct_004.nii.gz").read_bytes()
    (inputs / "ct_cut.nii.gz").write_bytes(cut[: len(cut) // 2])
    out = tmp_path / "out"
    args = ["--bundle", str(BUNDLES / CT), "--inputs", str(inputs), "--out_dir", str(out), "--checkpoint",
            str(ct_model), "--overlay", OVERLAY]
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*torchrun(), "--standalone", "--nnodes=1", "--nproc_per_node=2",
                           str(REPO / "scripts" / "batch_infer.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-4000:]  # the bad case; torchrun reports the ranks' exit code
    summary = json.loads((out / "run_summary.json").read_text())
    order = [c["case"] for c in batch_infer.bundle_cases(BUNDLES / CT, str(inputs))]
    assert [r["case"] for r in summary["cases"]] == order  # every case once, in the input order
    by_rank = {rank: [r["case"] for r in summary["cases"] if r["rank"] == rank] for rank in (0, 1)}
    assert by_rank == {rank: order[rank::2] for rank in (0, 1)}
    assert {r["case"]: r["status"] for r in summary["cases"]} == {**{c: "done" for c in order if c != "ct_cut"},
                                                                  "ct_cut": "invalid"}
    assert summary["counts"]["done"] == 4 and summary["counts"]["invalid"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(["ct_000", "ct_001", "ct_002", "ct_003",
                                                            "run_summary.csv", "run_summary.json"])
    with open(out / "run_summary.csv", newline="") as f:
        assert [(r["case"], r["rank"]) for r in csv.DictReader(f)] == [(r["case"], str(r["rank"]))
                                                                      for r in summary["cases"]]
    rerun = batch_infer.run_batch(str(BUNDLES / CT), str(inputs), str(out),
                                  BatchOptions(checkpoint=str(ct_model), overlay=OVERLAY, device="cpu",
                                               progress=False))
    assert {r["case"]: r["status"] for r in rerun["cases"] if r["case"] != "ct_cut"} == {
        c: "skipped" for c in order if c != "ct_cut"}
