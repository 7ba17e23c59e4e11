"""The repository's main job on its embedded default: phantom data -> short training -> evaluation -> inference.

Every step is a real ``python -m monai.bundle run`` call, the same command a user types, run from the repository root
(outside the bundles) with the bundle's ``cpu_demo.json`` overlay; the two bundles run at the same time, one thread
each, so that the whole round fits in a few minutes on 2 CPU cores. Checkpoints, metrics, predictions and one
figure per bundle go to ``--out_dir``; the bundle folders are not written to.

Usage:
    python scripts/quickstart.py [--out_dir outputs/quickstart] [--bundles "['ceds_mediastinum','cdugjl_liver']"]
        [--label_ratio 1.0] [--iterations "{'ceds_mediastinum': 800}"]
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fire
import numpy as np

import batch_infer
import case_figure
import phantoms

REPO = Path(__file__).resolve().parents[1]


class _Runner:
    """Runs ``monai.bundle`` commands for one bundle and prints progress."""

    def __init__(self, bundle: str, out_dir: Path, threads: int | None = None) -> None:
        self.bundle = bundle
        self.root = REPO / "bundles" / bundle
        self.out_dir = out_dir
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None

    def run(self, step: str, configs: list[str], **overrides: object) -> None:
        files = [str(self.root / "configs" / c) for c in (*configs, "cpu_demo.json")]
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files)]
        cmd += ["--bundle_root", str(self.root)]
        for key, value in overrides.items():
            cmd += [f"--{key}", str(value)]
        log = self.out_dir / "logs" / f"{step}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        print(f"[{self.bundle}] {step} ...", flush=True)
        with open(log, "w") as f:
            f.write(" ".join(shlex.quote(c) for c in cmd) + "\n\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = log.read_text().splitlines()[-40:]
            raise SystemExit(f"[{self.bundle}] {step} failed (exit {proc.returncode}); log: {log}\n" + "\n".join(tail))
        print(f"[{self.bundle}] {step} done in {time.time() - t0:.0f} s (log: {log})", flush=True)


def _held_out_case(datalist: Path) -> dict:
    """The first case of the datalist's test split that holds a tumour (the first case if none does)."""
    import nibabel as nib

    test = json.loads(datalist.read_text())["test"]
    return next((r for r in test if np.asarray(nib.load(datalist.parent / r["label"]).dataobj).any()), test[0])


def _figure(bundle: str, case: dict, data_dir: Path, inference_dir: Path, out_dir: Path) -> Path:
    """``<out_dir>/<bundle>.png``: the held-out case's image, ground truth, prediction and uncertainty/confidence."""
    second = batch_infer.doubt_map(json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text()))[0]
    image = _abs(case, data_dir, "image")
    name = case["case"]
    panel = case_figure.case_panel(
        f"{bundle}\n{name}", image[0] if isinstance(image, list) else image, data_dir / case["label"],
        next(inference_dir.rglob(f"{name}*_seg.nii.gz")), next(inference_dir.rglob(f"{name}*_{second}.nii.gz")),
        second)
    return case_figure.draw([panel], out_dir / f"{bundle}.png")


def _abs(record: dict, base: Path, key: str) -> str | list[str]:
    value = record[key]
    return [str(base / v) for v in value] if isinstance(value, list) else str(base / value)


def ceds(out_dir: Path, data_dir: Path, datalist: Path, threads: int | None = None, **train: object) -> dict:
    """Train, evaluate and run inference with ``ceds_mediastinum``; returns the output paths."""
    r = _Runner("ceds_mediastinum", out_dir, threads)
    common = {"dataset_dir": data_dir, "datalist": datalist, "ckpt_dir": out_dir / "models"}
    r.run("train", ["train.json"], output_dir=out_dir / "train", **train, **common)
    r.run("evaluate", ["train.json", "evaluate.json"], output_dir=out_dir / "evaluate", **common)
    case = _held_out_case(datalist)
    data = [{"image": _abs(case, data_dir, "image")}]
    r.run("inference", ["inference.json"], data=repr(data), output_dir=out_dir / "inference", **common)
    figure = _figure(r.bundle, case, data_dir, out_dir / "inference", out_dir.parent / "figures")
    return {"checkpoint": out_dir / "models", "metrics": out_dir / "evaluate", "inference": out_dir / "inference",
            "figure": figure}


def liver(out_dir: Path, data_dir: Path, datalist: Path, threads: int | None = None, **train: object) -> dict:
    """Train the contrast-enhanced teacher and the non-contrast student, evaluate, run inference (cdugjl_liver).

    The teacher learns from the student's labelled cases only (their CE phases), so no other label reaches the
    student.
    """
    r = _Runner("cdugjl_liver", out_dir, threads)
    common = {"dataset_dir": data_dir, "ckpt_dir": out_dir / "models"}
    r.run("train_teacher", ["train.json", "train_teacher.json"], datalist=datalist,
          output_dir=out_dir / "train_teacher", **train, **common)
    r.run("train", ["train.json"], datalist=datalist, output_dir=out_dir / "train", **train, **common)
    r.run("evaluate", ["train.json", "evaluate.json"], datalist=datalist, output_dir=out_dir / "evaluate", **common)
    case = _held_out_case(datalist)
    data = [{"image": _abs(case, data_dir, "image")}]
    r.run("inference", ["inference.json"], data=repr(data), output_dir=out_dir / "inference", **common)
    figure = _figure(r.bundle, case, data_dir, out_dir / "inference", out_dir.parent / "figures")
    return {"checkpoint": out_dir / "models", "metrics": out_dir / "evaluate", "inference": out_dir / "inference",
            "figure": figure}


JOBS = {"ceds_mediastinum": (ceds, phantoms.mediastinal_ct, "mediastinal_ct"),
        "cdugjl_liver": (liver, phantoms.liver_mri, "liver_mri")}
ITERATIONS = {"ceds_mediastinum": 1100, "cdugjl_liver": 600}
"""Training iterations of each bundle (per network: the liver teacher and student get this many each)."""


def _bundle_job(bundle: str, out: Path, n_cases: int, seed: int, label_ratio: float, threads: int | None,
                iterations: int) -> dict:
    """Phantom data (reused if present) and the whole round of one bundle; returns its output paths."""
    job, generate, name = JOBS[bundle]
    data_dir = out / "data" / name
    if not (data_dir / "dataset.json").exists():
        print(f"[data] generating {n_cases} phantom cases ({name}) in {data_dir} ...", flush=True)
        generate(str(data_dir), n_cases=n_cases, seed=seed)
    datalist = Path(phantoms.datalist(str(data_dir), label_ratio=label_ratio, seed=seed))
    epochs = max(1, round(iterations / 20))
    train = {"epochs": epochs, "epoch_length": 20, "val_interval": max(1, epochs // 4)}
    return job(out / bundle, data_dir, datalist, threads, **train)


def main(
    out_dir: str = "outputs/quickstart",
    bundles: tuple[str, ...] = ("ceds_mediastinum", "cdugjl_liver"),
    n_cases: int = 40,
    seed: int = 0,
    label_ratio: float = 1.0,
    iterations: dict[str, int] | None = None,
    parallel: bool = True,
) -> None:
    """Generate the phantom datasets, then train, evaluate and run inference with each bundle.

    Args:
        out_dir: where data, checkpoints, metrics and predictions are written.
        bundles: which bundles to run.
        n_cases: phantom cases per dataset.
        seed: phantom seed.
        label_ratio: fraction of the training cases with labels (``phantoms.datalist``); the others are the
            unlabelled data of the semi-supervised terms.
        iterations: training iterations per bundle (default :data:`ITERATIONS`), in epochs of 20 iterations.
        parallel: run the bundles at the same time, one thread each (``OMP_NUM_THREADS=1``: two processes with
            several threads each slow each other down on a small machine); else one after the other with the
            default threads.
    """
    out = (REPO / out_dir).resolve() if not Path(out_dir).is_absolute() else Path(out_dir)
    t0 = time.time()
    iterations = {**ITERATIONS, **(iterations or {})}
    workers = len(bundles) if parallel else 1
    threads = 1 if workers > 1 else None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {b: pool.submit(_bundle_job, b, out, n_cases, seed, label_ratio, threads, iterations[b])
                   for b in bundles}
        summary = {b: f.result() for b, f in futures.items()}
    print(f"\nQuick start finished in {(time.time() - t0) / 60:.1f} min.")
    report(summary)


def format_metric(name: str, value: float) -> str:
    """``name=value`` with 3 significant digits, or words where the value is missing (NaN or infinite)."""
    if math.isfinite(value):
        return f"{name}={value:.3g}"
    if any(k in name for k in ("hd95", "asd", "mae", "centre", "area")):
        return f"{name}=n/a: no tumour predicted"
    return f"{name}=n/a: undefined on these cases"


def report(summary: dict[str, dict[str, Path]]) -> None:
    """Print, per bundle, where the checkpoints, metrics, predictions and figure are, and the test-split means."""
    for bundle, paths in summary.items():
        print(f"\n{bundle}:")
        for what, path in paths.items():
            if Path(path).is_file():
                print(f"  {what:<11} {path}")
                continue
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            print(f"  {what:<11} {path}  ({len(files)} files)")
            shown = files[:6] if what != "metrics" else [f for f in files if f.name in ("metrics.csv", "per_case.csv")]
            for f in shown:
                print(f"      {f.relative_to(path)}")
        means = Path(paths["metrics"]) / "metrics.csv"
        if means.exists():
            rows = (line.split(",") for line in means.read_text().split())
            print("  test-split means: " + ", ".join(format_metric(name, float(value)) for name, value in rows))
    figures = [str(paths["figure"]) for paths in summary.values() if "figure" in paths]
    if figures:
        print("\nOpen " + " and ".join(figures) + " to see each model on a held-out case.")


if __name__ == "__main__":
    fire.Fire(main)
