"""The accuracy benchmark and its report: real (tiny) bundle runs, resumption, tables and plots from result files."""

from __future__ import annotations

import json
import math
import shutil
import sys

import benchmark_accuracy
import benchmark_report
import numpy as np
import pytest

from conftest import REPO, run_cmd

ENV = {"OMP_NUM_THREADS": "1"}


def test_planned_runs_cover_the_protocol():
    bench = benchmark_accuracy.Benchmark("cpu", REPO / "unused", REPO / "unused", 1)
    runs = bench.runs(["ceds_mediastinum", "cdugjl_liver"], ["accuracy", "ablation"], [0, 1, 2])
    accuracy = [r for r in runs if r.suite == "accuracy"]
    # 3 ratios x 3 methods x 3 seeds per bundle, but at 100 % (no unlabelled data) only the methods that differ
    # from supervised: CEDS and the mean teachers are the supervised run there; ablations at 10 % only;
    # accuracy first, whole seeds first
    assert len(accuracy) == (27 - 6) + (27 - 3) and len({(r.bundle, r.ratio, r.method, r.seed) for r in accuracy}) == 45
    assert {(r.bundle, r.method) for r in accuracy if r.ratio == 100} == {
        ("ceds_mediastinum", "supervised"), ("cdugjl_liver", "supervised"), ("cdugjl_liver", "cdugjl")}
    assert {r.ratio for r in runs if r.suite == "ablation"} == {10}
    assert [r.suite for r in runs] == sorted((r.suite for r in runs), key=lambda s: s != "accuracy")
    assert [r.seed for r in accuracy] == sorted(r.seed for r in accuracy)
    # an ablation is the bundle's method with exactly one change
    liver = {r.method: r.overrides for r in runs if r.bundle == "cdugjl_liver" and r.seed == 0}
    assert liver["cdugjl"] == {} and liver["no_contrast"] == {"contrast_weight": 0}
    assert liver["supervised"]["consistency_weight"] == 0 and liver["mean_teacher"]["uncertainty_mask"] is False


def test_bool_overrides_reach_the_config_as_bools():
    cmd = benchmark_accuracy._bundle_cmd("cdugjl_liver", ["train.json"], {"uncertainty_mask": False, "a": [1, 2]})
    assert cmd[cmd.index("--uncertainty_mask") + 1] == "False" and cmd[cmd.index("--a") + 1] == "[1, 2]"


def test_gap_recovered_and_missing_blocks():
    rows = [{"bundle": "ceds_mediastinum", "suite": "accuracy", "ratio": r, "method": m, "Dice mean": d}
            for r, m, d in ((100, "supervised", 0.8), (10, "supervised", 0.4), (10, "ceds", 0.7),
                            (10, "mean_teacher", 0.5))]
    gaps = {g["method"]: g for g in benchmark_report.gap_recovered(rows, "ceds_mediastinum")}
    assert gaps["ceds"]["recovered"] == pytest.approx(0.75) and gaps["mean_teacher"]["recovered"] == pytest.approx(0.25)
    assert benchmark_report.replace_block("a\n<!-- begin:x -->\nold\n<!-- end:x -->\nb", "x", "new") == (
        "a\n<!-- begin:x -->\nnew\n<!-- end:x -->\nb")
    with pytest.raises(KeyError):
        benchmark_report.replace_block("no markers", "x", "new")


def test_paired_differences_pair_seeds_and_give_an_interval():
    def run(method, seed, dice):
        return {"bundle": "ceds_mediastinum", "suite": "accuracy", "ratio": 10, "method": method, "seed": seed,
                "metrics": {"test_mean_dice": dice}}

    runs = [run("supervised", s, 0.5 + 0.1 * s) for s in range(3)]  # a large seed-to-seed spread ...
    runs += [run("ceds", s, 0.52 + 0.1 * s + 0.01 * (s == 1)) for s in range(3)]  # ... and a steady paired gain
    runs += [run("mean_teacher", 0, 0.4)]
    got = {d["comparison"]: d for d in benchmark_report.paired_differences(runs, "ceds_mediastinum")}
    ceds = got["ceds - supervised"]
    assert ceds["seeds"] == [0, 1, 2] and ceds["differences"] == pytest.approx([0.02, 0.03, 0.02])
    assert ceds["mean"] == pytest.approx(0.07 / 3) and ceds["low"] > 0 and ceds["excludes_zero"]
    # half-width: t(0.975, 2) x sd / sqrt(3)
    assert ceds["high"] - ceds["mean"] == pytest.approx(4.302653 * np.std([0.02, 0.03, 0.02], ddof=1) / np.sqrt(3))
    one = got["mean_teacher - supervised"]  # one common seed: no interval, no claim
    assert one["seeds"] == [0] and math.isnan(one["low"]) and not one["excludes_zero"]
    assert "ceds - mean_teacher" in got
    table = benchmark_report.paired_table(runs, "ceds_mediastinum")
    assert "| 10 % | ceds - supervised | 3 | +0.020, +0.030, +0.020 | +0.023 |" in table
    assert "n/a (one seed)" in table


def test_ablation_differences_pair_the_own_method_with_each_ablation():
    def run(suite, method, seed, dice):
        return {"bundle": "ceds_mediastinum", "suite": suite, "ratio": 10, "method": method, "seed": seed,
                "metrics": {"test_mean_dice": dice}}

    runs = [run("accuracy", "ceds", s, 0.6 + 0.05 * s) for s in range(3)]
    runs += [run("ablation", "random_mask", s, 0.55 + 0.05 * s + 0.01 * (s == 2)) for s in range(3)]
    runs += [run("ablation", "probability_mask", 1, 0.7), run("accuracy", "supervised", 0, 0.1)]
    got = {d["comparison"]: d for d in benchmark_report.paired_differences(runs, "ceds_mediastinum", "ablation")}
    assert set(got) == {"ceds - random_mask", "ceds - probability_mask"}  # accuracy pairs stay out
    assert got["ceds - random_mask"]["differences"] == pytest.approx([0.05, 0.05, 0.04])
    assert got["ceds - random_mask"]["excludes_zero"]
    assert got["ceds - probability_mask"]["seeds"] == [1] and not got["ceds - probability_mask"]["excludes_zero"]
    assert "| 10 % | ceds - random_mask | 3 | +0.050, +0.050, +0.040 |" in benchmark_report.paired_table(
        runs, "ceds_mediastinum", "ablation")


def test_runtime_table_counts_a_shared_teacher_once():
    def run(suite, method, train, teacher=None):
        seconds = {"train": train, "evaluate": 60, **({"teacher": teacher} if teacher else {})}
        return {"bundle": "cdugjl_liver", "suite": suite, "ratio": 10, "seed": 0, "method": method, "seconds": seconds}

    runs = [run("accuracy", "cdugjl", 540, 600), run("ablation", "no_feature", 240, 600),
            run("accuracy", "supervised", 120)]
    lines = benchmark_report.runtime_table(runs, workers=2).splitlines()
    # accuracy: (9 + 1) + (2 + 1) minutes of runs and the 10-minute teacher; the ablation reuses that teacher
    assert lines[2] == "| cdugjl_liver | ablation | 1 | 5 | 0 | 5 | 0.0 |"
    assert lines[3] == "| cdugjl_liver | accuracy | 2 | 13 | 10 | 23 | 0.2 |"
    assert lines[4] == "| all | | 3 | | | 28 | 0.2 |"


@pytest.mark.integration
def test_tiny_profile_runs_resumes_and_reports(tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark_accuracy.py"), "run", "--profile", "tiny",
           "--bundles", "['ceds_mediastinum']", "--suites", "['accuracy']", "--seeds", "[0]", "--ratios", "[10]",
           "--methods", "['supervised','ceds']", "--results_dir", str(results / "accuracy"), "--work_dir", str(work)]
    proc = run_cmd(cmd, cwd=tmp_path, timeout=600, env=ENV)
    assert "2 runs to do" in proc.stdout and "0 failed" in proc.stdout
    files = sorted((results / "accuracy" / "tiny" / "ceds_mediastinum" / "accuracy").glob("*.json"))
    assert [f.name for f in files] == ["r010_ceds_s0.json", "r010_supervised_s0.json"]
    record = json.loads(files[0].read_text())
    assert record["overrides"] == {"mode": "ceds"} and 0.0 <= record["metrics"]["test_mean_dice"] <= 1.0
    metadata = json.loads((REPO / "bundles" / "ceds_mediastinum" / "configs" / "metadata.json").read_text())
    assert record["bundle_version"] == metadata["version"]  # which defaults the run had
    assert "--eval_checkpoint" in record["commands"]["evaluate"]  # the final checkpoint, not a selected one
    # finished runs are skipped
    again = run_cmd(cmd, cwd=tmp_path, timeout=120, env=ENV)
    assert "0 runs to do" in again.stdout

    doc = tmp_path / "benchmarks.md"
    shutil.copy(REPO / "docs" / "benchmarks.md", doc)
    run_cmd([sys.executable, str(REPO / "scripts" / "benchmark_report.py"), "report", "--profile", "tiny",
             "--doc", str(doc), "--results", str(results)], cwd=tmp_path, timeout=120, env=ENV)
    text = doc.read_text()
    block = text[text.index("<!-- begin:accuracy_ceds_mediastinum -->"):text.index("<!-- end:accuracy_ceds")]
    assert "python scripts/benchmark_accuracy.py run --profile tiny" in block
    assert f"| 10 % | ceds | 1 | {record['metrics']['test_mean_dice']:.3f} ± 0.000 |" in block
    assert (tmp_path / "benchmarks" / "dice_vs_label_ratio_tiny.png").stat().st_size > 1000
    summary = json.loads((results / "summary.json").read_text())
    assert {(r["ratio"], r["method"]) for r in summary["accuracy"]} == {(10, "supervised"), (10, "ceds")}
    assert (results / "accuracy_tiny_summary.csv").read_text().startswith("bundle,")


@pytest.mark.integration
def test_trial_changes_the_phantom_and_never_reads_the_test_split(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark_accuracy.py"), "trial", "--bundle", "cdugjl_liver",
           "--name", "bright", "--profile", "tiny", "--phantom", "{'conspicuity': [1.5, 1.5]}",
           "--train", "{'epochs': 2}", "--work_dir", str(tmp_path)]
    proc = run_cmd(cmd, cwd=tmp_path, timeout=600, env=ENV)
    folder = tmp_path / "trials" / "bright" / "tiny"
    generator = json.loads((folder / "data" / "cdugjl_liver" / "dataset.json").read_text())["generator"]
    assert generator["conspicuity"] == [1.5, 1.5]
    record = json.loads((folder / "cdugjl_liver" / "trial" / "r100_supervised_s0.json").read_text())
    assert record["profile_settings"]["data"]["conspicuity"] == [1.5, 1.5]
    assert record["overrides"]["epochs"] == 2
    assert [i for i, _ in record["validation"]] == [2, 4]  # tiny: epoch_length 2, validation every epoch
    assert "metrics" not in record and "evaluate" not in record["commands"]
    assert not (folder / "cdugjl_liver" / "trial" / "r100_supervised_s0" / "test").exists()
    assert "bright cdugjl_liver r100_supervised_s0: validation Dice" in proc.stdout
    # another training setting of the same trial: its own record, the same data (not generated again)
    data_stamp = (folder / "data" / "cdugjl_liver" / "dataset.json").stat().st_mtime_ns
    run_cmd([*cmd[:-4], "--variant", "one_epoch", "--train", "{'epochs': 1}", "--work_dir", str(tmp_path)],
            cwd=tmp_path, timeout=600, env=ENV)
    other = json.loads((folder / "cdugjl_liver" / "one_epoch" / "r100_supervised_s0.json").read_text())
    assert [i for i, _ in other["validation"]] == [2] and other["overrides"]["epochs"] == 1
    assert json.loads((folder / "cdugjl_liver" / "trial" / "r100_supervised_s0.json").read_text()) == record
    assert (folder / "data" / "cdugjl_liver" / "dataset.json").stat().st_mtime_ns == data_stamp
    # variants of the distilled student share one teacher: their overrides are the student's, not the teacher's
    distilled = [*cmd[:-4], "--method", "cdugjl", "--work_dir", str(tmp_path)]
    run_cmd([*distilled, "--variant", "kl_half", "--train", "{'epochs': 1, 'distill_kl_weight': 0.5}"],
            cwd=tmp_path, timeout=600, env=ENV)
    teacher = folder / "cdugjl_liver" / "teachers" / "r100_s0" / "done.json"
    assert "--distill_kl_weight" not in json.loads(teacher.read_text())["command"]
    teacher_stamp = teacher.stat().st_mtime_ns
    run_cmd([*distilled, "--variant", "kl_zero", "--train", "{'epochs': 1, 'distill_kl_weight': 0.0}"],
            cwd=tmp_path, timeout=600, env=ENV)
    assert teacher.stat().st_mtime_ns == teacher_stamp
    kl_zero = json.loads((folder / "cdugjl_liver" / "kl_zero" / "r100_cdugjl_s0.json").read_text())
    assert kl_zero["overrides"]["distill_kl_weight"] == 0.0


def test_a_profile_key_a_method_never_reads_leaves_its_results_current():
    bench = benchmark_accuracy.Benchmark("cpu", REPO / "unused", REPO / "unused", 1)
    settings = bench.settings("ceds_mediastinum")
    moved = {**settings, "train": {**settings["train"], "confidence_length": 0.5}}
    for method, current in (("supervised", True), ("mean_teacher", True), ("ceds", False)):
        record = {"bundle": "ceds_mediastinum", "method": method, "profile_settings": moved}
        assert bench.current(record) is current
        assert bench.current({**record, "profile_settings": settings})
    # a key every method reads makes every result stale
    longer = {**settings, "train": {**settings["train"], "epochs": 81}}
    assert not bench.current({"bundle": "ceds_mediastinum", "method": "supervised", "profile_settings": longer})


def test_trials_pair_validation_curves_by_seed(tmp_path):
    curves = {("a", 0): [0.5, 0.6, 0.7], ("a", 1): [0.5, 0.6, 0.8],
              ("b", 0): [0.5, 0.6, 0.6], ("b", 1): [0.5, 0.7, 0.6]}
    for (name, seed), curve in curves.items():
        record = {"validation": [[i, v] for i, v in enumerate(curve)]}
        (tmp_path / f"{name}_s{seed}.json").write_text(json.dumps(record))
    table = benchmark_report.trials({n: str(tmp_path / (n + "_s{seed}.json")) for n in "ab"}, [0, 1, 2], [["a", "b"]],
                                    last=2)
    assert "| 2 | not run | not run |" in table and "| mean | 0.750 | 0.600 |" in table
    # final: +0.1, +0.2 (mean +0.15); last two: (0.65 - 0.6), (0.7 - 0.65) -> +0.05, +0.05
    row = next(line for line in table.splitlines() if line.startswith("| a - b |"))
    assert row.startswith("| a - b | 2 | +0.100, +0.200 | +0.150 (") and "| +0.050 (+0.050 to +0.050) |" in row
