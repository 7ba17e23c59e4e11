"""Tables, summaries and plots of ``docs/benchmarks.md`` from the benchmark result files, never typed by hand.

Reads the per-run JSON files of ``benchmark_accuracy.py`` and ``benchmark_speed.py`` under
``docs/benchmarks/results/``, writes ``results/accuracy_<profile>_summary.csv`` and ``results/summary.json``, draws
``docs/benchmarks/dice_vs_label_ratio_<profile>.png`` (next to the document), and replaces each generated block of
``docs/benchmarks.md`` (between ``<!-- begin:NAME -->`` and ``<!-- end:NAME -->``) with its table, as well as the
accuracy table of each bundle's model card (``bundles/<bundle>/docs/README.md``, found relative to the document).

``trials`` compares runs by their validation curves (how a setting is chosen without the test split).

``figure`` runs each bundle's ``inference.json`` with the final checkpoint of its own method (10 % labels,
seed 0) on test cases and draws ``docs/benchmarks/test_cases_<profile>.png``: image, ground truth, prediction and
uncertainty (liver) or confidence (CEDS) through the slice with the most tumour.

Usage:
    python scripts/benchmark_report.py report [--profile cpu]
    python scripts/benchmark_report.py figure [--profile cpu] [--n_cases 3]
    python scripts/benchmark_report.py trials --runs "{'a': 'docs/.../a_s{seed}.json', 'b': ...}" \
        --seeds "[0,1,2,3,4]" --pairs "[['a','b']]"
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import batch_infer
import benchmark_accuracy as ba
import case_figure
import fire
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
BENCH = DOCS / "benchmarks"
RESULTS = BENCH / "results"

BUNDLES = ("ceds_mediastinum", "cdugjl_liver")
RATIOS = (10, 20, 100)
OWN_METHOD = {"ceds_mediastinum": "ceds", "cdugjl_liver": "cdugjl"}
METHOD_ORDER = ("supervised", "mean_teacher", "ceds", "cdugjl")
# displayed metric -> metrics.csv key of the bundles' evaluate.json (the same names in both)
_SEGMENTATION = {"Dice": "test_mean_dice", "HD95 (mm)": "test_hd95_mm", "ASD (mm)": "test_asd_mm"}
METRICS = {
    "ceds_mediastinum": _SEGMENTATION,
    "cdugjl_liver": {**_SEGMENTATION, "X MAE (mm)": "test_x_mae_mm", "Y MAE (mm)": "test_y_mae_mm",
                     "area MAE (mm²)": "test_area_mae_mm2", "ECE": "test_ece", "unc. AUROC": "test_uncertainty_auroc"},
}
# metric names of ceds_mediastinum before 0.3.0 (its supervised arithmetic is unchanged, so its results still count)
LEGACY_METRIC_NAMES = {"dice": "test_mean_dice", "hd95": "test_hd95_mm", "asd": "test_asd_mm"}
ACCURACY_COMMAND = "python scripts/benchmark_accuracy.py run --profile {profile}"
REPORT_COMMAND = "python scripts/benchmark_report.py report --profile {profile}"


def load_runs(profile: str, results: Path = RESULTS) -> list[dict]:
    """Every finished accuracy/ablation run of ``profile`` made with the profile's current settings
    (``Benchmark.current``: a run made with other settings is stale: ``benchmark_accuracy.py run`` redoes it, and
    it is never mixed into a table); metric names of older bundle versions are read under their current names
    (:data:`LEGACY_METRIC_NAMES`)."""
    bench = ba.Benchmark(profile, results / "accuracy", ba.WORK_DIR, 1)
    runs = [json.loads(p.read_text()) for p in sorted((results / "accuracy" / profile).glob("*/*/*.json"))]
    for r in runs:
        r["metrics"] = {LEGACY_METRIC_NAMES.get(k, k): v for k, v in r["metrics"].items()}
    return [r for r in runs if bench.current(r)]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if math.isfinite(x)], float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (bundle, suite, ratio, method): seeds and mean/sd of every metric over the seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["bundle"], r["suite"], r["ratio"], r["method"])].append(r)
    rows = []
    for (bundle, suite, ratio, method), members in sorted(groups.items()):
        row = {"bundle": bundle, "suite": suite, "ratio": ratio, "method": method,
               "seeds": sorted(m["seed"] for m in members),
               "train_minutes": _mean_sd([m["seconds"]["train"] / 60 for m in members])[0]}
        for name, key in METRICS[bundle].items():
            mean, sd = _mean_sd([m["metrics"].get(key, float("nan")) for m in members])
            row[f"{name} mean"], row[f"{name} sd"] = mean, sd
        row["dice_values"] = [m["metrics"][METRICS[bundle]["Dice"]] for m in members]
        rows.append(row)
    return rows


def _fmt(mean: float, sd: float, digits: int) -> str:
    return "n/a" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _method_key(m: str) -> int:
    return METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)


def accuracy_table(rows: list[dict], bundle: str) -> str:
    """Markdown table of the accuracy suite of ``bundle``."""
    names = list(METRICS[bundle])
    lines = ["| labels | method | seeds | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for row in sorted((r for r in rows if r["bundle"] == bundle and r["suite"] == "accuracy"),
                      key=lambda r: (r["ratio"], _method_key(r["method"]))):
        cells = [_fmt(row[f"{n} mean"], row[f"{n} sd"], 3 if n in ("Dice", "ECE", "unc. AUROC") else 1)
                 for n in names]
        lines.append(f"| {row['ratio']} % | {row['method']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_recovered(rows: list[dict], bundle: str) -> list[dict]:
    """Fraction of the (supervised at r %) -> (supervised at 100 %) Dice gap each semi-supervised method recovers."""
    dice = {(r["ratio"], r["method"]): r["Dice mean"]
            for r in rows if r["bundle"] == bundle and r["suite"] == "accuracy"}
    full = dice.get((100, "supervised"))
    out = []
    for ratio in (10, 20):
        base = dice.get((ratio, "supervised"))
        for method in ("mean_teacher", OWN_METHOD[bundle]):
            value = dice.get((ratio, method))
            if None in (full, base, value):
                continue
            gap = full - base
            out.append({"ratio": ratio, "method": method, "supervised": base, "full": full, "method_dice": value,
                        "gap": gap, "recovered": (value - base) / gap if gap > 0 else float("nan")})
    return out


def gap_table(rows: list[dict], bundle: str) -> str:
    lines = ["| labels | method | Dice | supervised at that ratio | supervised at 100 % | gap recovered |",
             "|---|---|---|---|---|---|"]
    for g in gap_recovered(rows, bundle):
        rec = "n/a (no gap)" if not math.isfinite(g["recovered"]) else f"{int(round(100 * g['recovered']))} %"
        lines.append(f"| {g['ratio']} % | {g['method']} | {g['method_dice']:.3f} | {g['supervised']:.3f} | "
                     f"{g['full']:.3f} | {rec} |")
    return "\n".join(lines)


def t_interval(differences: np.ndarray) -> tuple[float, float, float]:
    """Mean and two-sided 95 % Student-t interval ``(mean, low, high)`` of paired differences (NaN bounds below
    two)."""
    from scipy import stats

    mean, low, high = float(np.mean(differences)), float("nan"), float("nan")
    if len(differences) > 1:
        half = float(stats.t.ppf(0.975, len(differences) - 1) * np.std(differences, ddof=1)
                     / math.sqrt(len(differences)))
        low, high = mean - half, mean + half
    return mean, low, high


def paired_differences(runs: list[dict], bundle: str, suite: str = "accuracy") -> list[dict]:
    """Per-seed paired Dice differences. ``suite="accuracy"``: each semi-supervised method against supervised
    training, and the bundle's own method against the plain mean teacher, at 10 % and 20 % labels;
    ``"ablation"``: the bundle's own method against each ablation (at 10 %), so that a positive difference is what
    the ablated part adds.

    Runs of one seed share the data, the split and the initialisation, so the difference of two methods within a
    seed is free of the seed-to-seed spread. Returns one dict per comparison with at least one common seed:
    ``ratio``, ``comparison`` (``"a - b"``), ``seeds``, ``differences`` (per seed), ``mean`` and the two-sided 95 %
    Student-t interval ``low`` / ``high`` (NaN below two seeds), and ``excludes_zero``.
    """
    mine = [r for r in runs if r["bundle"] == bundle]
    dice = {(r["ratio"], r["method"], r["seed"]): r["metrics"].get(METRICS[bundle]["Dice"], float("nan"))
            for r in mine}
    own = OWN_METHOD[bundle]
    if suite == "accuracy":
        pairs = [(ratio, pair) for ratio in (10, 20) for pair in (("mean_teacher", "supervised"),
                                                                  (own, "supervised"), (own, "mean_teacher"))]
    else:
        pairs = [(ba.ABLATION_RATIO, (own, v)) for v in sorted({r["method"] for r in mine if r["suite"] == "ablation"})]
    out = []
    for ratio, (a, b) in pairs:
        seeds = sorted(s for (r, m, s) in dice if r == ratio and m == a and (ratio, b, s) in dice)
        if not seeds:
            continue
        diffs = np.array([dice[(ratio, a, s)] - dice[(ratio, b, s)] for s in seeds])
        mean, low, high = t_interval(diffs)
        out.append({"ratio": ratio, "comparison": f"{a} - {b}", "seeds": seeds, "differences": diffs.tolist(),
                    "mean": mean, "low": low, "high": high,
                    "excludes_zero": bool(math.isfinite(low) and (low > 0 or high < 0))})
    return out


def paired_table(runs: list[dict], bundle: str, suite: str = "accuracy") -> str:
    lines = ["| labels | comparison | seeds | per-seed difference | mean | 95 % interval | excludes 0 |",
             "|---|---|---|---|---|---|---|"]
    for d in paired_differences(runs, bundle, suite):
        interval = "n/a (one seed)" if not math.isfinite(d["low"]) else f"{d['low']:+.3f} to {d['high']:+.3f}"
        lines.append(f"| {d['ratio']} % | {d['comparison']} | {len(d['seeds'])} | "
                     f"{', '.join(f'{x:+.3f}' for x in d['differences'])} | {d['mean']:+.3f} | {interval} | "
                     f"{'yes' if d['excludes_zero'] else 'no'} |")
    return "\n".join(lines)


def ablation_table(rows: list[dict], bundle: str) -> str:
    names = ["Dice", "HD95 (mm)"] + (["ECE", "unc. AUROC"] if bundle == "cdugjl_liver" else [])
    lines = ["| variant (10 % labels) | seeds | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    own = [r for r in rows if r["bundle"] == bundle and r["suite"] == "accuracy" and r["ratio"] == 10
           and r["method"] == OWN_METHOD[bundle]]
    abl = sorted((r for r in rows if r["bundle"] == bundle and r["suite"] == "ablation"), key=lambda r: r["method"])
    for row in own + abl:
        label = f"{row['method']} (all terms)" if row["suite"] == "accuracy" else row["method"]
        cells = [_fmt(row[f"{n} mean"], row[f"{n} sd"], 1 if "mm" in n else 3) for n in names]
        lines.append(f"| {label} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runtime_table(runs: list[dict], workers: int = 2) -> str:
    """Minutes the runs took (``seconds`` of each result file), per bundle and suite; a liver teacher is shared by the
    runs of its (label ratio, seed) and counted once, in the first suite that used it."""
    minutes: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    teachers: set[tuple] = set()
    for r in sorted(runs, key=lambda r: (r["bundle"], r["suite"] != "accuracy", r["ratio"], r["seed"])):
        entry = minutes[(r["bundle"], r["suite"])]
        entry[0] += 1
        entry[1] += (r["seconds"]["train"] + r["seconds"]["evaluate"]) / 60
        if "teacher" in r["seconds"] and (r["bundle"], r["ratio"], r["seed"]) not in teachers:
            teachers.add((r["bundle"], r["ratio"], r["seed"]))
            entry[2] += r["seconds"]["teacher"] / 60
    lines = [f"| bundle | suite | runs | train + evaluate (min) | teachers (min) | total (min) | "
             f"total / {workers} runs at a time (h) |", "|---|---|---|---|---|---|---|"]
    total = 0.0
    for (bundle, suite), (n, run_min, teacher_min) in sorted(minutes.items()):
        total += run_min + teacher_min
        lines.append(f"| {bundle} | {suite} | {n} | {run_min:.0f} | {teacher_min:.0f} | {run_min + teacher_min:.0f} | "
                     f"{(run_min + teacher_min) / workers / 60:.1f} |")
    lines.append(f"| all | | {sum(v[0] for v in minutes.values())} | | | {total:.0f} | {total / workers / 60:.1f} |")
    return "\n".join(lines)


def _speed(results: Path, name: str) -> dict | None:
    path = results / "speed" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _env_line(data: dict) -> str:
    env = data["environment"]
    return (f"Measured {env['date_utc'][:10]} on {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} "
            f"torch thread(s), load average {env['load_average'][0]:.1f}), torch {env['torch']}.")


def scan_table(data: dict) -> str:
    lines = [_fence(data["command"]), _env_line(data), "",
             "| device | L | scan | time (s) | baseline | baseline (s) | speed-up | peak MB scan / baseline | "
             "max abs. error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        method = r.get("method", "chunked")
        if r.get("status") != "ok":
            lines.append(f"| {r['device']} | {r.get('length', '')} | {method} | {r['status']} | | | | | |")
            continue
        lines.append(f"| {r['device']} | {r['length']} | {method} | {r['time_s']:.3f} | {r['baseline']} | "
                     f"{r['baseline_time_s']:.3f} | "
                     f"{r['speedup']:.1f}x | {r.get('peak_mb', float('nan')):.0f} / "
                     f"{r.get('baseline_peak_mb', float('nan')):.0f} | {r['max_abs_error']:.1e} |")
    return "\n".join(lines)


def iteration_table(data: dict) -> str:
    lines = [_fence(data["command"]), _env_line(data), "",
             "| bundle | method | median iteration (s) | ratio to supervised | fastest-iteration ratio | "
             "labelled + unlabelled inputs |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['bundle']} | {r['method']} | {r['iteration_s']:.3f} | {r['ratio']:.2f} | "
                     f"{r['min_ratio']:.2f} | {r['labelled_batch']} + {r['unlabelled_batch']} |")
    return "\n".join(lines)


def profile_table(data: dict) -> str:
    """Where a training iteration's time goes (``benchmark_speed.py profile``), milliseconds per phase."""
    phases = ("data", "prepare", "forward", "between", "loss", "backward", "optimiser", "handlers")
    lines = [_fence(data["command"]), _env_line(data), "",
             "| bundle | method | batch | " + " | ".join(f"{p} (ms)" for p in phases)
             + " | step (ms) | network fwd + bwd (ms) | data share | step / network |",
             "|---|---|---|" + "---|" * len(phases) + "---|---|---|---|"]
    for r in data["rows"]:
        batch = "x".join(str(s) for s in r["batch_shape"])
        lines.append(f"| {r['bundle']} | {r['method']} | {batch} | "
                     + " | ".join(f"{1000 * r[f'{p}_s']:.1f}" for p in phases)
                     + f" | {1000 * r['step_s']:.0f} | {1000 * r['network_s']:.0f} | {100 * r['data_share']:.0f} % | "
                     f"{r['step_ratio']:.2f} |")
    return "\n".join(lines)


def inference_table(data: dict) -> str:
    lines = [_fence(data["command"]), _env_line(data), "",
             "| volume | widths | network | baseline | time (s) | baseline (s) | time ratio | peak RSS GB | "
             "baseline peak RSS GB | extrapolated |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        shape = "x".join(str(s) for s in r["shape"])
        lines.append(f"| {r['volume']} {shape} | {r['widths']} | {r['network']} | {r['baseline']} | "
                     f"{r['time_s']:.0f} | {r['baseline_time_s']:.0f} | {r['time_ratio']:.2f} | "
                     f"{r['peak_rss_gb']:.2f} | {r['baseline_peak_rss_gb']:.2f} | "
                     f"{'yes' if r.get('extrapolated') else 'no'} |")
    return "\n".join(lines)


def monailabel_table(data: dict, bundle: str | None = None) -> str:
    """One MONAI Label training round per bundle (``benchmark_speed.py monailabel``); one bundle's row if given."""
    lines = [_fence(data["command"]), _env_line(data), "",
             "| bundle | widths | epochs | labelled studies | round (s) | model.pt (MB) | all of models/ (MB) | "
             "model.pt replaced |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if bundle is None or r["bundle"] == bundle:
            lines.append(f"| {r['bundle']} | {r['widths']} | {r['max_epochs']} | {r['labelled_studies']} | "
                         f"{r['round_s']:.0f} | {r['model_pt_mb']:.1f} | {r['models_mb']:.1f} | "
                         f"{'yes' if r['model_changed'] else 'no'} |")
    return "\n".join(lines)


def _bundle_panels():
    """A figure with one panel per bundle, side by side: ``(figure, axes [1, n_bundles])``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, len(BUNDLES), figsize=(5.5 * len(BUNDLES), 4), squeeze=False)


def _save(fig, path: Path) -> None:
    """Write ``fig`` to the PNG ``path`` (parent folders created) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dice(rows: list[dict], path: Path) -> None:
    """Test Dice against label ratio, one panel per bundle, one line per method, every seed as a dot."""
    fig, axes = _bundle_panels()
    for ax, bundle in zip(axes[0], BUNDLES):
        acc = [r for r in rows if r["bundle"] == bundle and r["suite"] == "accuracy"]
        for i, method in enumerate(sorted({r["method"] for r in acc}, key=_method_key)):
            pts = sorted((r for r in acc if r["method"] == method), key=lambda r: r["ratio"])
            x = np.array([r["ratio"] for r in pts], float)
            offset = 1 + 0.04 * (i - 1)  # dodge the methods on the log axis
            ax.errorbar(x * offset, [r["Dice mean"] for r in pts], yerr=[r["Dice sd"] for r in pts], marker="o",
                        capsize=3, label=method)
            for r in pts:
                ax.scatter([r["ratio"] * offset] * len(r["dice_values"]), r["dice_values"], s=10, alpha=0.5,
                           color=ax.lines[-1].get_color())
        ax.set_xscale("log")
        ax.set_xticks(list(RATIOS), [f"{r} %" for r in RATIOS])
        ax.set_xlabel("labelled fraction of the training pool")
        ax.set_ylabel("test Dice (mean ± sd over seeds; dots: seeds)")
        ax.set_title(bundle)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_validation(runs: list[dict], path: Path, method: str = "supervised") -> None:
    """Validation Dice against training iteration of every ``method`` run (accuracy suite), one panel per bundle.

    One colour per label ratio, one line per seed (the curves the runs logged: ``validation`` in the result files).
    """
    fig, axes = _bundle_panels()
    colours = dict(zip(RATIOS, ("tab:red", "tab:orange", "tab:blue")))
    for ax, bundle in zip(axes[0], BUNDLES):
        chosen = [r for r in runs if r["bundle"] == bundle and r["suite"] == "accuracy" and r["method"] == method
                  and r.get("validation")]
        for ratio in RATIOS:
            for i, run in enumerate(sorted((r for r in chosen if r["ratio"] == ratio), key=lambda r: r["seed"])):
                x, y = zip(*run["validation"])
                ax.plot(x, y, marker=".", color=colours[ratio], alpha=0.8, label=f"{ratio} % labels" if not i else None)
        ax.set_xlabel("training iteration")
        ax.set_ylabel(f"validation Dice ({method}; one line per seed)")
        ax.set_ylim(0, 1)
        ax.set_title(bundle)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def replace_block(text: str, name: str, body: str) -> str:
    """Replace the generated block ``name`` of a markdown document (markers kept); the block must exist."""
    pattern = re.compile(rf"(<!-- begin:{re.escape(name)} -->\n).*?(<!-- end:{re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise KeyError(f"no generated block {name!r} in the document")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def _fence(command: str) -> str:
    return f"```bash\n{command}\n```\n"


def report(profile: str = "cpu", doc: str = str(DOCS / "benchmarks.md"), results: str = str(RESULTS)) -> None:
    """Regenerate the summary files, the plot and every generated block of ``doc`` from the result files.

    Args:
        profile: benchmark profile whose accuracy results are reported.
        doc: the markdown document with ``<!-- begin:NAME -->`` / ``<!-- end:NAME -->`` blocks.
        results: the results folder (``accuracy/<profile>/...`` and ``speed/*.json``).
    """
    results_dir = Path(results)
    runs = load_runs(profile, results_dir)
    rows = summarise(runs)
    with open(results_dir / f"accuracy_{profile}_summary.csv", "w", newline="") as f:
        fields = sorted({k for r in rows for k in r if k != "dice_values"}, key=lambda k: (k not in (
            "bundle", "suite", "ratio", "method", "seeds"), k))
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = {"profile": profile, "accuracy": rows,
               "gap_recovered": {b: gap_recovered(rows, b) for b in BUNDLES},
               "paired_differences": {b: paired_differences(runs, b) for b in BUNDLES},
               "ablation_differences": {b: paired_differences(runs, b, "ablation") for b in BUNDLES}}
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_dice(rows, Path(doc).parent / "benchmarks" / f"dice_vs_label_ratio_{profile}.png")
    plot_validation(runs, Path(doc).parent / "benchmarks" / f"validation_dice_{profile}.png")

    head = _fence(ACCURACY_COMMAND.format(profile=profile) + "\n" + REPORT_COMMAND.format(profile=profile))
    text = Path(doc).read_text()
    for bundle in BUNDLES:
        text = replace_block(text, f"accuracy_{bundle}", head + "\n" + accuracy_table(rows, bundle))
        text = replace_block(text, f"gap_{bundle}", head + "\n" + gap_table(rows, bundle))
        text = replace_block(text, f"paired_{bundle}", head + "\n" + paired_table(runs, bundle))
        differences = paired_table(runs, bundle, "ablation") if paired_differences(runs, bundle, "ablation") else ""
        text = replace_block(text, f"ablation_{bundle}", head + "\n" + ablation_table(rows, bundle)
                             + ("\n\n" + differences if differences else ""))
    text = replace_block(text, "runtime", head + "\n" + runtime_table(runs))
    for name, table in (("scan", scan_table), ("iteration", iteration_table), ("inference", inference_table),
                        ("profile", profile_table), ("profile_before", profile_table),
                        ("monailabel", monailabel_table)):
        data = _speed(results_dir, name)
        if data is not None:
            text = replace_block(text, f"speed_{name}", table(data))
    Path(doc).write_text(text)
    monailabel = _speed(results_dir, "monailabel")
    for bundle in BUNDLES:  # the model cards carry the accuracy table and their MONAI Label round too
        card = Path(doc).parent.parent / "bundles" / bundle / "docs" / "README.md"
        if card.exists():
            text = replace_block(card.read_text(), f"accuracy_{bundle}", head + "\n" + accuracy_table(rows, bundle))
            if monailabel is not None and any(r["bundle"] == bundle for r in monailabel["rows"]):
                text = replace_block(text, f"monailabel_{bundle}", monailabel_table(monailabel, bundle))
            card.write_text(text)
    print(f"{len(rows)} groups from {results_dir / 'accuracy' / profile} -> {doc}")


def figure(profile: str = "cpu", n_cases: int = 3, ratio: int = 100, seed: int = 0, method: str = "supervised",
           work_dir: str = str(REPO / "outputs" / "benchmarks"), out: str = str(BENCH)) -> Path:
    """Predict ``n_cases`` test cases with each bundle's network of one run and draw them side by side.

    Args:
        profile: benchmark profile whose checkpoints are used (from ``benchmark_accuracy.py run``).
        n_cases: test cases per bundle (rows), the first ones of the test split with a tumour.
        ratio: label ratio of the run whose checkpoint is shown.
        seed: seed of that run.
        method: method of that run (``supervised``, ``mean_teacher`` or the bundle's own).
        work_dir: the benchmark's work folder (data and checkpoints).
        out: folder of the PNG.

    Returns:
        path of the PNG.
    """
    import nibabel as nib

    bench = ba.Benchmark(profile, ba.RESULTS_DIR, Path(work_dir), threads=2)
    panels = []
    for bundle in BUNDLES:
        prof = ba.PROFILES[profile][bundle]
        data = bench.data_dir(bundle)
        run_dir = bench.work / bundle / "accuracy" / f"r{ratio:03d}_{method}_s{seed}"
        ckpt = run_dir / "models" / "model.pt"  # the final student
        if not ckpt.exists():
            raise FileNotFoundError(f"{ckpt}: run `python scripts/benchmark_accuracy.py run --profile {profile}` first")
        test = [r for r in json.loads((data / f"datalist_{ratio}.json").read_text())["test"]
                if nib.load(data / r["label"]).get_fdata().any()][:n_cases]  # cases with a tumour
        records = [{k: ([str(data / x) for x in v] if isinstance(v, list) else str(data / v))
                    for k, v in r.items() if k in ("image", "label")} for r in test]
        network = {k: v for k, v in prof.train.items() if k in ("channels", "pixdim", "roi_size")}
        pred_dir = run_dir / "figure"
        cmd = ba._bundle_cmd(bundle, ["inference.json", *prof.overlays],
                             {"data": [{"image": r["image"]} for r in records], "checkpoint": ckpt,
                              "output_dir": pred_dir, "device": "cpu", **network})
        ba._run_logged(cmd, run_dir / "figure.log", threads=2)
        second = batch_infer.doubt_map(json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json")
                                                  .read_text()))[0]
        for record, case in zip(records, test):
            image_file = record["image"][0] if isinstance(record["image"], list) else record["image"]
            name = case.get("case", Path(image_file).name.split(".")[0])  # outputs are named by case
            panels.append(case_figure.case_panel(
                f"{bundle}\n{name}", image_file, record["label"], next(pred_dir.rglob(f"{name}*_seg.nii.gz")),
                next(pred_dir.rglob(f"{name}*_{second}.nii.gz")), second))
    path = case_figure.draw(panels, Path(out) / f"test_cases_{profile}.png")
    print(f"-> {path}")
    return path


def trials(runs: dict[str, str], seeds: list[int], pairs: list[list[str]], last: int = 4) -> str:
    """Compare runs on their validation curves (trials of ``benchmark_accuracy.py trial`` and benchmark runs alike):
    the final validation Dice of every run per seed, and paired differences between runs of the same seed.

    Args:
        runs: ``{name: path pattern}``, each pattern a result file with ``{seed}`` in its name.
        seeds: the seeds (a run missing for a seed is left out of that seed's pairs).
        pairs: ``[[a, b], ...]``: the differences ``a - b`` to report.
        last: the second figure of each pair averages each run's last ``last`` validations (less noise).

    Returns:
        the markdown tables.
    """
    curves = {}
    for name, pattern in runs.items():
        for seed in seeds:
            path = REPO / pattern.format(seed=seed)
            if path.exists():
                curves[(name, seed)] = [v for _, v in json.loads(path.read_text())["validation"]]
    lines = ["| seed | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for seed in seeds:
        cells = [f"{curves[(n, seed)][-1]:.3f}" if (n, seed) in curves else "not run" for n in runs]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = [np.mean([curves[(n, s)][-1] for s in seeds if (n, s) in curves]) for n in runs]
    lines += ["| mean | " + " | ".join(f"{m:.3f}" for m in means) + " |", "",
              f"| comparison | seeds | per-seed final difference | mean (95 % interval) | mean of the last {last} "
              "validations: difference (95 % interval) |", "|---|---|---|---|---|"]
    for a, b in pairs:
        common = [s for s in seeds if (a, s) in curves and (b, s) in curves]
        final = np.array([curves[(a, s)][-1] - curves[(b, s)][-1] for s in common])
        smooth = np.array([np.mean(curves[(a, s)][-last:]) - np.mean(curves[(b, s)][-last:]) for s in common])
        (fm, fl, fh), (sm, sl, sh) = t_interval(final), t_interval(smooth)
        lines.append(f"| {a} - {b} | {len(common)} | {', '.join(f'{x:+.3f}' for x in final)} | "
                     f"{fm:+.3f} ({fl:+.3f} to {fh:+.3f}) | {sm:+.3f} ({sl:+.3f} to {sh:+.3f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire({"report": report, "figure": figure, "trials": trials})
