"""Accuracy and ablation benchmark of both bundles on phantom data: every run is a real ``monai.bundle run``.

For each bundle the benchmark generates one phantom dataset with a fixed held-out test split (``phantoms.py``,
data seed 0), then trains with label ratios 10 %, 20 % and 100 % crossed with {supervised-only on the labelled
subset, plain mean teacher, the bundle's own method} and several training seeds (at 100 % only the methods
that do more than supervised training without unlabelled data), and evaluates the **final**
checkpoint of each run on the test split (no checkpoint is ever selected on the test split). The ablations switch
one term of the bundle's method off at a time, at 10 % labels. For ``cdugjl_liver`` the contrast-enhanced
teacher is trained first, per (label ratio, seed), on the same labelled subset as the student, so no label outside
the subset leaks into the student.

Every finished run writes ``<results_dir>/<profile>/<bundle>/<suite>/<run>.json`` (its commands, wall times and
test metrics, and the profile settings). A run whose JSON exists with the current profile settings is skipped, so a
profile can be completed over several sittings, and changing a profile reruns its runs; checkpoints
and logs go to ``<work_dir>`` and are not needed afterwards. ``benchmark_report.py`` turns the JSON files into the
tables and plots of ``docs/benchmarks.md``.

Profiles:
    ``cpu``: small networks and short schedules on 2 CPU cores (about 2 hours for everything, 2 runs at a time
    with one thread each). ``gpu``: the bundles' own (paper-sized) networks, patch sizes and schedules, one run at a
    time.

Usage:
    python scripts/benchmark_accuracy.py run --profile cpu [--bundles "['ceds_mediastinum','cdugjl_liver']"]
        [--suites "['accuracy','ablation']"] [--seeds "[0,1,2]"] [--workers 2]
    python scripts/benchmark_accuracy.py teachers --profile cpu [--ratios "[10,100]"] [--seeds "[0]"]
    python scripts/benchmark_accuracy.py status --profile cpu
    python scripts/benchmark_accuracy.py trial --bundle cdugjl_liver --name c1 --ratio 10 \
        --phantom "{'conspicuity': [1, 1]}"       # validation split only: how settings are chosen
"""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import fire

import phantoms

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "docs" / "benchmarks" / "results" / "accuracy"
WORK_DIR = REPO / "outputs" / "benchmarks"
RATIOS = (10, 20, 100)

# overrides that turn the liver student into each method (train.json defaults = the full CdUgJL)
_NO_DISTILLATION = {"attention_weight": 0, "feature_weight": 0, "contrast_weight": 0, "distill_kl_weight": 0}
METHODS = {
    "cdugjl_liver": {
        "supervised": {**_NO_DISTILLATION, "consistency_weight": 0},
        "mean_teacher": {**_NO_DISTILLATION, "uncertainty_mask": False},
        "cdugjl": {},
    },
    "ceds_mediastinum": {
        "supervised": {"mode": "supervised"},
        "mean_teacher": {"mode": "mean_teacher"},
        "ceds": {"mode": "ceds"},
    },
}
# methods that differ from supervised training only on unlabelled data: at 100 % labels (no unlabelled case left)
# they are the supervised run itself, so they are not run again
UNLABELLED_ONLY = {"cdugjl_liver": ("mean_teacher",), "ceds_mediastinum": ("mean_teacher", "ceds")}
# the bundle's method with one term switched off, at 10 % labels
ABLATIONS = {
    "cdugjl_liver": {
        "no_attention": {"attention_weight": 0},
        "no_feature": {"feature_weight": 0},
        "no_contrast": {"contrast_weight": 0},
        "no_distill_kl": {"distill_kl_weight": 0},
        "no_consistency": {"consistency_weight": 0},
        "no_uncertainty_mask": {"uncertainty_mask": False},
        "no_evidential_kl": {"kl_weight": 0},
        # not a term of the method: the labelled rows and the strong views in one forward pass, sharing batch norm
        "one_pass_batch_norm": {"train#trainer#separate_norm_statistics": False},
    },
    "ceds_mediastinum": {
        # the confidence head against the teacher's own probability and against chance, with the same per-class
        # fraction and normalisation (a kept fraction of 1, no mask at all, is the mean teacher itself)
        "probability_mask": {"mode": "ceds", "confidence_mask": "probability"},
        "random_mask": {"mode": "ceds", "confidence_mask": "random"},
        "authors_threshold_mask": {"mode": "ceds", "confidence_mask": "threshold", "consistency_normalization": "mean"},
        "no_confidence_retraining": {"mode": "ceds", "confidence_interval": 0},
        # the authors' student pass: labelled (noised) and unlabelled patches together, sharing batch norm
        "one_pass_batch_norm": {"mode": "ceds", "train#trainer#separate_norm_statistics": False},
    },
}
ABLATION_RATIO = 10
# profile training keys that a method never reads: changing one leaves that method's results current (CEDS's
# supervised and mean-teacher modes have no confidence re-training windows; scripts.trainer.CEDSSchedule)
UNREAD_TRAIN_KEYS = {
    "ceds_mediastinum": {m: ("confidence_interval", "confidence_length") for m in ("supervised", "mean_teacher")},
}


@dataclass(frozen=True)
class BundleProfile:
    """How one bundle is benchmarked in one profile.

    Attributes:
        data: keyword arguments of the phantom generator (``phantoms.liver_mri`` / ``phantoms.mediastinal_ct``).
        split: keyword arguments of ``phantoms.datalist`` (``val_fraction``, ``test_fraction``).
        overlays: config files applied after ``train.json`` (and ``evaluate.json``), relative to ``configs/``.
        train: overrides of every training run (student and teacher).
        teacher: extra overrides of the liver teacher's training (``train.json`` + ``train_teacher.json``).
    """

    data: dict
    split: dict = field(default_factory=dict)
    overlays: tuple[str, ...] = ()
    train: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)


# of 120 cases 24 test, 16 validation and a training pool of 80 (10 % labels: 8 volumes, 20 %: 16); the 8 test cases
# of a 40-case split, two of them tumour-free, moved a run's test Dice by several points
CPU_SPLIT_120 = {"test_fraction": 0.2, "val_fraction": 2 / 15}

PROFILES = {
    "cpu": {
        "cdugjl_liver": BundleProfile(
            # 80 training volumes (10 %: 8 labelled) and benign mimics: with 2 labelled volumes (64 cases) the CE
            # teacher saw two of four enhancement patterns and lost to its student; doc: Targets. Four T2WI / DWI
            # appearance modes per class (rare ones missing from 8 labelled volumes, the CE phases one cue for all):
            # without them 10 % ended 5 points below 100 %, with them 8; doc: Phantom difficulty
            data={"n_cases": 120, "max_mimics": 3, "appearance_modes": 4},
            split=CPU_SPLIT_120,
            overlays=("cpu_demo.json",),
            # 3200 iterations: at 800 the 100 % run was still far from its plateau (validation Dice 0.830 against
            # 0.89 at 3200) and leaned to false positives; doc: Phantom difficulty
            train={"epochs": 160, "epoch_length": 20, "val_interval": 16, "checkpoint_interval": 40},
        ),
        "ceds_mediastinum": BundleProfile(
            # 80 training volumes: with 24, supervised training fitted its training cases (Dice 0.88) far better
            # than the validation cases (0.72); doc: Targets
            data={"n_cases": 120},
            split=CPU_SPLIT_120,
            overlays=("cpu_demo.json",),
            # 1600 iterations of two volumes (four 32³ patches): at 800 the validation Dice still rose; the
            # confidence branch re-trained in every iteration after the warm-up, as train.json (doc: Confidence mask)
            train={"epochs": 80, "epoch_length": 20, "val_interval": 8, "batch_size": 2, "warmup": 1 / 3,
                   "confidence_interval": 1 / 3, "confidence_length": 1 / 3, "checkpoint_interval": 20},
        ),
    },
    # a smoke test of the whole pipeline (tests/test_benchmark.py), seconds per run; its numbers mean nothing
    "tiny": {
        "cdugjl_liver": BundleProfile(
            data={"n_cases": 10, "size": 64, "n_slices": 8},
            overlays=("cpu_demo.json",),
            train={"channels": [4, 8, 16, 32, 64], "roi_size": [32, 32], "num_samples": 2, "epochs": 1,
                   "epoch_length": 2, "val_interval": 1},
        ),
        "ceds_mediastinum": BundleProfile(
            data={"n_cases": 10, "size": 48, "n_slices": 32},
            overlays=("cpu_demo.json",),
            train={"channels": [2, 4, 8, 16, 32], "roi_size": [16, 16, 16], "epochs": 2, "epoch_length": 2,
                   "val_interval": 2, "warmup": 0.5, "confidence_interval": 0.5, "confidence_length": 0.5},
        ),
    },
    "gpu": {
        "cdugjl_liver": BundleProfile(data={"n_cases": 120, "size": 256, "n_slices": 32}, train={"epochs": 300}),
        "ceds_mediastinum": BundleProfile(
            data={"n_cases": 120, "size": 192, "n_slices": 128}, train={"epochs": 3000}),
    },
}


def _phantom_generator(bundle: str):
    return phantoms.liver_mri if bundle == "cdugjl_liver" else phantoms.mediastinal_ct


def phantom_arguments(bundle: str, data: dict) -> dict:
    """Every argument the bundle's phantom generator runs with: its defaults updated by ``data``, data seed 0 (JSON
    types), so that a changed generator default counts as a changed profile. An argument of
    ``phantoms.ADDED_ARGUMENTS`` (added later, its default drawing as before it existed) is left out at its default,
    so that results recorded before it existed stay current."""
    parameters = inspect.signature(_phantom_generator(bundle)).parameters.items()
    defaults = {k: p.default for k, p in parameters if k != "out_dir" and p.default is not inspect.Parameter.empty}
    arguments = {**defaults, **data, "seed": 0}
    arguments = {k: v for k, v in arguments.items() if k not in phantoms.ADDED_ARGUMENTS or v != defaults.get(k)}
    return json.loads(json.dumps(arguments))


def _bundle_cmd(bundle: str, configs: list[str], overrides: dict) -> list[str]:
    root = REPO / "bundles" / bundle
    files = [str(root / "configs" / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files), "--bundle_root", str(root)]
    for key, value in overrides.items():
        # Python literals: fire reads ``False`` as a bool but ``false`` as a (truthy) string
        cmd += [f"--{key}", repr(value) if isinstance(value, (list, bool)) else str(value)]
    return cmd


def _run_logged(cmd: list[str], log: Path, threads: int) -> float:
    """Run ``cmd`` from the repository root with its output in ``log``; returns the wall time in seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = str(threads)
    start = time.time()
    with open(log, "w") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"exit {proc.returncode}: {log}\n{tail}")
    return time.time() - start


def validation_curve(train_log: Path, epoch_length: int) -> list[list[float]]:
    """``[[iteration, value], ...]``: the key validation metric a training log reports after each validation.

    MONAI's ``StatsHandler`` logs ``Epoch[N] Metrics -- <name>: <value>`` after each validation of epoch ``N``; the
    iteration is ``N * epoch_length``.
    """
    pattern = re.compile(r"Epoch\[(\d+)\] Metrics -- [\w]+: ([-\d.eE+naif]+)")
    return [[int(m.group(1)) * epoch_length, float(m.group(2))] for m in pattern.finditer(train_log.read_text())]


def _read_metrics(eval_dir: Path) -> dict[str, float]:
    """The test-split summary of ``evaluate.json``: ``metrics.csv`` (``name,value`` or ``name<TAB>value`` lines)."""
    rows = (re.split(r"[\t,]", line) for line in (eval_dir / "metrics.csv").read_text().splitlines() if line)
    return {row[0]: float(row[1]) for row in rows}


@dataclass(frozen=True)
class Run:
    """One training + test evaluation."""

    bundle: str
    suite: str
    ratio: int
    method: str
    seed: int
    overrides: dict

    @property
    def name(self) -> str:
        return f"r{self.ratio:03d}_{self.method}_s{self.seed}"


class Benchmark:
    """Plans, runs and skips the runs of one profile.

    Args:
        profile: a key of :data:`PROFILES`.
        results_dir: the per-run JSON files go to ``<results_dir>/<profile>/``.
        work_dir: data, checkpoints and logs go to ``<work_dir>/<profile>/``.
        threads: ``OMP_NUM_THREADS`` of each run.
        settings: ``{bundle: BundleProfile}`` to use instead of the profile's (trials with other settings).
    """

    def __init__(self, profile: str, results_dir: Path, work_dir: Path, threads: int,
                 settings: dict[str, BundleProfile] | None = None) -> None:
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
        self.profile = profile
        self.profiles = {**PROFILES[profile], **(settings or {})}
        self.results = Path(results_dir) / profile
        self.work = Path(work_dir) / profile
        self.threads = threads
        self._teacher_locks: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    def runs(self, bundles: list[str], suites: list[str], seeds: list[int]) -> list[Run]:
        """The planned runs: the accuracy suite before the ablations, each ordered by seed, so that an interrupted
        profile has whole seeds first."""
        runs = []
        for bundle in bundles:
            if "accuracy" in suites:
                runs += [Run(bundle, "accuracy", r, m, s, o) for s in seeds for r in RATIOS
                         for m, o in METHODS[bundle].items() if r < 100 or m not in UNLABELLED_ONLY[bundle]]
            if "ablation" in suites:
                own = list(METHODS[bundle].values())[-1]
                runs += [Run(bundle, "ablation", ABLATION_RATIO, a, s, {**own, **o}) for s in seeds
                         for a, o in ABLATIONS[bundle].items()]
        return sorted(runs, key=lambda r: (r.suite != "accuracy", r.seed))

    def result_path(self, run: Run) -> Path:
        return self.results / run.bundle / run.suite / f"{run.name}.json"

    def settings(self, bundle: str) -> dict:
        """The bundle's profile settings and phantom arguments as recorded in every result (JSON types)."""
        profile = self.profiles[bundle]
        return {**json.loads(json.dumps(asdict(profile))), "phantom": phantom_arguments(bundle, profile.data)}

    def current(self, record: dict) -> bool:
        """Whether a result ``record`` was made with the current profile settings, leaving out the training keys
        its method never reads (:data:`UNREAD_TRAIN_KEYS`)."""
        unread = UNREAD_TRAIN_KEYS.get(record["bundle"], {}).get(record["method"], ())

        def read(settings: dict | None) -> dict | None:
            if not isinstance(settings, dict):
                return settings
            return {**settings, "train": {k: v for k, v in settings.get("train", {}).items() if k not in unread}}

        return read(record.get("profile_settings")) == read(self.settings(record["bundle"]))

    def finished(self, run: Run) -> bool:
        """Whether ``run`` has a result made with the current profile settings (a changed profile reruns it)."""
        path = self.result_path(run)
        return path.exists() and self.current(json.loads(path.read_text()))

    def data_dir(self, bundle: str) -> Path:
        """Generate the bundle's phantom dataset and its 10/20/100 % datalists, again when the phantom arguments or
        the split changed (recorded in ``benchmark_data.json``)."""
        folder = self.work / "data" / bundle
        profile = self.profiles[bundle]
        wanted = {"phantom": phantom_arguments(bundle, profile.data), "split": json.loads(json.dumps(profile.split))}
        marker = folder / "benchmark_data.json"
        folder.parent.mkdir(parents=True, exist_ok=True)
        # one writer at a time, across processes too (`run` and `teachers` started together)
        with self._lock, open(folder.parent / f".{bundle}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not marker.exists() or json.loads(marker.read_text()) != wanted:
                shutil.rmtree(folder, ignore_errors=True)
                _phantom_generator(bundle)(out_dir=str(folder), **wanted["phantom"])
                for r in RATIOS:
                    phantoms.datalist(str(folder), label_ratio=r / 100, seed=0, **profile.split)
                marker.write_text(json.dumps(wanted, indent=1))
        return folder

    def _common(self, bundle: str, ratio: int, out: Path) -> dict:
        data = self.data_dir(bundle)
        return {"dataset_dir": data, "datalist": data / f"datalist_{ratio}.json", "ckpt_dir": out / "models",
                "device": "cuda" if self.profile == "gpu" else "cpu", "num_workers": 4 if self.profile == "gpu" else 0}

    def teacher(self, ratio: int, seed: int) -> tuple[Path, dict]:
        """The liver teacher of (label ratio, seed), trained on the CE phases of the labelled subset (once).

        Returns:
            its checkpoint and its record (``seconds``, ``command``, ``validation`` curve, ``profile_settings``).
        """
        with self._lock:
            lock = self._teacher_locks.setdefault((ratio, seed), threading.Lock())
        out = self.work / "cdugjl_liver" / "teachers" / f"r{ratio:03d}_s{seed}"
        ckpt = out / "models" / "teacher" / "model.pt"
        done = out / "done.json"
        settings = self.settings("cdugjl_liver")
        with lock:
            if not done.exists() or json.loads(done.read_text()).get("profile_settings") != settings:
                prof = self.profiles["cdugjl_liver"]
                overrides = {**self._common("cdugjl_liver", ratio, out), "output_dir": out / "train",
                             "seed": seed, **prof.train, **prof.teacher}
                cmd = _bundle_cmd("cdugjl_liver", ["train.json", "train_teacher.json", *prof.overlays], overrides)
                seconds = _run_logged(cmd, out / "train.log", self.threads)
                curve = validation_curve(out / "train.log", int(overrides.get("epoch_length") or 1))
                done.write_text(json.dumps({"seconds": seconds, "command": [str(c) for c in cmd],
                                            "validation": curve, "profile_settings": settings}, indent=1))
            return ckpt, json.loads(done.read_text())

    def execute(self, run: Run, evaluate: bool = True) -> dict:
        """Train (and for the liver method, first its teacher), evaluate the final checkpoint on the test split
        (unless ``evaluate`` is false: a trial judged on its validation curve only).

        A liver student distilled from a teacher gets the final validation Dice of the supervised run of the same
        ratio and seed, when that has finished, as ``teacher_min_dice`` with ``teacher_check`` ``"warn"``: a worse
        teacher is used (the benchmark measures the method as configured) but logged, and both values are
        recorded under ``teacher_check``."""
        prof = self.profiles[run.bundle]
        out = self.work / run.bundle / run.suite / run.name
        common = self._common(run.bundle, run.ratio, out)
        metadata = REPO / "bundles" / run.bundle / "configs" / "metadata.json"
        record = {"bundle": run.bundle, "bundle_version": json.loads(metadata.read_text())["version"],
                  "suite": run.suite, "ratio": run.ratio, "method": run.method,
                  "seed": run.seed, "profile": self.profile, "profile_settings": self.settings(run.bundle),
                  "overrides": run.overrides, "commands": {}, "seconds": {}}
        train = {**common, "output_dir": out / "train", "seed": run.seed, **prof.train, **run.overrides}
        if run.bundle == "cdugjl_liver" and any(float(train.get(k, 1)) > 0 for k in (
                "attention_weight", "feature_weight", "contrast_weight", "distill_kl_weight")):
            teacher, info = self.teacher(run.ratio, run.seed)
            train["teacher_ckpt"] = teacher
            record["commands"]["teacher"], record["seconds"]["teacher"] = info["command"], info["seconds"]
            supervised = Run(run.bundle, run.suite, run.ratio, "supervised", run.seed, {})
            if self.finished(supervised):  # the student's teacher check, logged and recorded rather than refused
                train["teacher_min_dice"] = json.loads(self.result_path(supervised).read_text())["validation"][-1][1]
                train["teacher_check"] = "warn"
                record["teacher_check"] = {"supervised": train["teacher_min_dice"],
                                           "teacher": info["validation"][-1][1]}
        cmd = _bundle_cmd(run.bundle, ["train.json", *prof.overlays], train)
        record["seconds"]["train"] = _run_logged(cmd, out / "train.log", self.threads)
        record["commands"]["train"] = cmd
        record["validation"] = validation_curve(out / "train.log", int(train.get("epoch_length") or 1))
        if evaluate:
            test = {**{k: v for k, v in train.items() if k != "output_dir"}, "output_dir": out / "test",
                    "eval_checkpoint": out / "models" / "model.pt"}  # the final student, in both bundles
            cmd = _bundle_cmd(run.bundle, ["train.json", "evaluate.json", *prof.overlays], test)
            record["seconds"]["evaluate"] = _run_logged(cmd, out / "evaluate.log", self.threads)
            record["commands"]["evaluate"] = cmd
            record["metrics"] = _read_metrics(out / "test")
        record["commands"] = {k: [str(c) for c in v] for k, v in record["commands"].items()}
        path = self.result_path(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(path)
        return record


def run(
    profile: str = "cpu",
    bundles: list[str] = ("ceds_mediastinum", "cdugjl_liver"),
    suites: list[str] = ("accuracy", "ablation"),
    seeds: list[int] = (0, 1, 2),
    ratios: list[int] = RATIOS,
    methods: list[str] | None = None,
    workers: int = 2,
    threads: int = 1,
    results_dir: str = str(RESULTS_DIR),
    work_dir: str = str(WORK_DIR),
) -> int:
    """Run every run of the profile that has no result yet, ``workers`` at a time.

    Args:
        profile: ``"cpu"`` or ``"gpu"``.
        bundles: bundles to benchmark.
        suites: ``"accuracy"`` (ratios x methods x seeds) and/or ``"ablation"`` (at 10 % labels).
        seeds: training seeds (the data split is fixed).
        ratios: label ratios (percent) to run, of 10, 20, 100.
        methods: methods and ablation variants to run (default: all).
        workers: runs at the same time.
        threads: ``OMP_NUM_THREADS`` of each run.
        results_dir: where the per-run JSON files go (``<results_dir>/<profile>/<bundle>/<suite>/``).
        work_dir: data, checkpoints and logs.

    Returns:
        number of runs that failed (their errors are printed; rerunning retries them).
    """
    bench = Benchmark(profile, Path(results_dir), Path(work_dir), threads)
    pending = [r for r in bench.runs(list(bundles), list(suites), list(seeds)) if not bench.finished(r)
            and r.ratio in ratios and (methods is None or r.method in methods)]
    for bundle in bundles:
        bench.data_dir(bundle)
    print(f"{len(pending)} runs to do ({profile} profile, {workers} at a time)", flush=True)
    failed = 0
    start = time.time()

    def one(r: Run) -> None:
        nonlocal failed
        if bench.finished(r):  # done meanwhile by another sitting
            return
        t0 = time.time()
        try:
            rec = bench.execute(r)
        except Exception as e:  # a failed run is reported and retried on the next call
            failed += 1
            print(f"FAILED {r.bundle} {r.suite} {r.name}: {e}", flush=True)
            return
        dice = next((v for k, v in rec["metrics"].items() if "dice" in k), float("nan"))
        print(f"[{(time.time() - start) / 60:5.1f} min] {r.bundle} {r.suite} {r.name}: test Dice {dice:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, pending))
    print(f"done in {(time.time() - start) / 60:.1f} min, {failed} failed", flush=True)
    return failed


def teachers(
    profile: str = "cpu",
    ratios: list[int] = RATIOS,
    seeds: list[int] = (0, 1, 2),
    results_dir: str = str(RESULTS_DIR),
    work_dir: str = str(WORK_DIR),
    threads: int = 1,
    name: str | None = None,
    phantom: dict | None = None,
    split: dict | None = None,
    variant: str = "trial",
) -> None:
    """Train (or reuse) the liver's contrast-enhanced teachers and compare them with the supervised students.

    Prints, per label ratio and seed, the final validation Dice of the teacher (CE phases, the labelled subset) and
    of the supervised non-contrast student of the same subset (its result file, if it is finished with the current
    profile settings): the teacher
    must be the better of the two for the distillation to carry anything. With ``name``, the teachers are trained
    on the data of that :func:`trial` (``phantom`` and ``split`` as given to it) and compared with its supervised
    runs of ``variant``.
    """
    bench, suite = Benchmark(profile, Path(results_dir), Path(work_dir), threads), "accuracy"
    if name is not None:
        base = PROFILES[profile]["cdugjl_liver"]
        settings = replace(base, data={**base.data, **(phantom or {})}, split={**base.split, **(split or {})})
        folder = Path(work_dir) / "trials" / name
        bench, suite = Benchmark(profile, folder, folder, threads, {"cdugjl_liver": settings}), variant
    bench.data_dir("cdugjl_liver")
    print("ratio  seed  teacher (CE)  supervised student (T2WI + DWI)   final validation Dice")
    for ratio in ratios:
        for seed in seeds:
            teacher = bench.teacher(ratio, seed)[1]["validation"]
            student = Run("cdugjl_liver", suite, ratio, "supervised", seed, {})
            finished = bench.finished(student)
            curve = json.loads(bench.result_path(student).read_text())["validation"] if finished else None
            print(f"{ratio:5d}  {seed:4d}  {teacher[-1][1]:12.3f}  {curve[-1][1] if curve else float('nan'):31.3f}",
                  flush=True)


def trial(
    bundle: str,
    name: str,
    ratio: int = 100,
    seed: int = 0,
    method: str = "supervised",
    phantom: dict | None = None,
    train: dict | None = None,
    split: dict | None = None,
    variant: str = "trial",
    profile: str = "cpu",
    threads: int = 1,
    work_dir: str = str(WORK_DIR),
) -> list[list[float]]:
    """One run of the profile with other phantom or training settings, judged on the validation split only.

    This is how phantom difficulty and profile settings are chosen: the test split is never evaluated. The data
    (the profile's phantom arguments updated by ``phantom``) and the run go to ``<work_dir>/trials/<name>/<profile>/``;
    runs of one ``name`` share their data. The record (validation curve, commands, seconds, settings) is written to
    ``<work_dir>/trials/<name>/<profile>/<bundle>/<variant>/<run>.json``, so that runs of one ``name`` with other
    training settings (one ``variant`` each) compare on the same data.

    Args:
        bundle: the bundle.
        name: the trial's folder (one per phantom setting).
        ratio: label ratio in percent (10, 20 or 100).
        seed: training seed.
        method: a key of ``METHODS[bundle]``.
        phantom: phantom arguments to change, e.g. ``{"conspicuity": [1, 1]}``.
        train: training overrides of this run, e.g. ``{"epochs": 80}`` (a liver teacher keeps the profile's, so
            that variants of one trial share it).
        split: split arguments to change, e.g. ``{"test_fraction": 0.2}``.
        variant: the run's folder inside the trial, one per training setting of the same data.
        profile: the profile the trial starts from.
        threads: ``OMP_NUM_THREADS`` of the run.
        work_dir: the benchmark's work folder.

    Returns:
        the validation curve, ``[[iteration, validation Dice], ...]``.
    """
    base = PROFILES[profile][bundle]
    settings = replace(base, data={**base.data, **(phantom or {})}, split={**base.split, **(split or {})})
    folder = Path(work_dir) / "trials" / name
    bench = Benchmark(profile, folder, folder, threads, {bundle: settings})
    run = Run(bundle, variant, int(ratio), method, int(seed), {**METHODS[bundle][method], **(train or {})})
    record = bench.execute(run, evaluate=False)
    print(f"{name} {bundle} {run.name}: validation Dice "
          + " ".join(f"{v:.3f}@{int(i)}" for i, v in record["validation"]), flush=True)
    return record["validation"]


def status(profile: str = "cpu", results_dir: str = str(RESULTS_DIR)) -> None:
    """Print how many runs of each bundle and suite are finished."""
    bench = Benchmark(profile, Path(results_dir), WORK_DIR, 1)
    for bundle in METHODS:
        for suite in ("accuracy", "ablation"):
            planned = bench.runs([bundle], [suite], [0, 1, 2])
            finished = sum(bench.finished(r) for r in planned)
            print(f"{bundle:18s} {suite:9s} {finished}/{len(planned)} (3 seeds)")


if __name__ == "__main__":
    fire.Fire({"run": run, "teachers": teachers, "trial": trial, "status": status})
