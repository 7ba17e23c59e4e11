"""Per-iteration training losses of short fixed-seed runs of both bundles, to show that a refactor kept behaviour.

Each scenario trains one bundle config (``train.json`` + ``cpu_demo.json`` + a few overrides) for a dozen
iterations on tiny phantoms, one process per scenario, and records ``engine.state.output``'s ``loss`` after every
iteration. ``record`` writes ``{scenario: [loss, ...]}`` to a JSON file; ``compare`` prints the largest difference
per scenario between two such files. Run ``record`` on the code before and after a change and compare:

    python scripts/loss_trace.py record --out before.json      # on the old commit
    python scripts/loss_trace.py record --out after.json       # on the new one
    python scripts/loss_trace.py compare before.json after.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]

# 2 epochs of 6 iterations; validation off
_COMMON = {"epochs": 2, "epoch_length": 6, "val_interval": 1000, "checkpoint_interval": 1000, "seed": 3}
_CEDS_SCHEDULE = {"warmup": 0.25, "confidence_interval": 0.34, "confidence_length": 0.09}
_LIVER_NO_TEACHER = {"attention_weight": 0, "feature_weight": 0, "contrast_weight": 0, "distill_kl_weight": 0}

SCENARIOS: dict[str, tuple[str, str, str, dict]] = {
    # name: (bundle, config, datalist, overrides)
    "liver_supervised": ("cdugjl_liver", "train.json", "datalist_100.json",
                         {**_LIVER_NO_TEACHER, "consistency_weight": 0}),
    "liver_consistency": ("cdugjl_liver", "train.json", "datalist_20.json",
                          {**_LIVER_NO_TEACHER, "consistency_weight": 1.0, "consistency_rampup": 0.0}),
    "liver_teacher": ("cdugjl_liver", "train.json+train_teacher.json", "datalist_20.json", {}),
    "liver_cdugjl": ("cdugjl_liver", "train.json", "datalist_20.json", {"consistency_rampup": 0.0}),
    # distillation heads whose initial values do not depend on where in the RNG stream they are drawn (identity
    # feature projections, no region head), so that a change of construction order keeps this trace
    "liver_cdugjl_identity_heads": ("cdugjl_liver", "train.json", "datalist_20.json",
                                    {"consistency_rampup": 0.0, "contrast_embed_dim": 0}),
    "ceds_supervised": ("ceds_mediastinum", "train.json", "datalist_20.json", {"mode": "supervised"}),
    "ceds_mean_teacher": ("ceds_mediastinum", "train.json", "datalist_20.json",
                          {**_CEDS_SCHEDULE, "mode": "mean_teacher"}),
    "ceds_ceds": ("ceds_mediastinum", "train.json", "datalist_20.json", {**_CEDS_SCHEDULE, "mode": "ceds"}),
}


def _data(work: Path) -> dict[str, Path]:
    """Tiny phantom datasets (8 cases) with 20 % and 100 % datalists, as the test suite's fixtures."""
    import phantoms

    folders = {}
    # every phantom argument that a default change could move is fixed, so that traces stay comparable
    liver = {"size": 64, "n_slices": 8, "lesion_radius": (0.13, 0.28), "conspicuity": (0.6, 1.7),
             "cyst_like_fluid": False}
    ct = {"size": 64, "n_slices": 48, "tumour_radius": (0.2, 0.3)}
    for bundle, generator, kwargs in (("cdugjl_liver", "liver_mri", liver),
                                      ("ceds_mediastinum", "mediastinal_ct", ct)):
        out = work / "data" / bundle
        if not (out / "datalist_100.json").exists():
            getattr(phantoms, generator)(str(out), n_cases=8, seed=0, **kwargs)
            for ratio in (0.2, 1.0):
                phantoms.datalist(str(out), label_ratio=ratio, seed=0)
        folders[bundle] = out
    return folders


def one(bundle: str, config: str, overrides: str | dict, out: str) -> None:
    """Run one scenario in this process and write its per-iteration losses to ``out`` (a JSON list).

    Args:
        bundle: the bundle folder name.
        config: the training config (``train.json``), or configs joined by ``+`` (``train.json+train_teacher.json``).
        overrides: config overrides (a dict, or its JSON text).
        out: the output JSON file.
    """
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    root = REPO / "bundles" / bundle
    files = [str(root / "configs" / c) for c in (*config.split("+"), "cpu_demo.json")]
    workflow = ConfigWorkflow(config_file=files, workflow_type="train", bundle_root=str(root),
                              **(json.loads(overrides) if isinstance(overrides, str) else overrides))
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    losses: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        output = engine.state.output
        output = output[0] if isinstance(output, list) else output
        losses.append(float(output["loss"]))

    workflow.run()
    Path(out).write_text(json.dumps(losses))


def record(out: str, scenarios: list[str] | None = None, work_dir: str | None = None) -> None:
    """Run the scenarios (one process each, one thread) and write ``{scenario: [loss per iteration]}`` to ``out``.

    ``liver_cdugjl`` distils from the teacher that ``liver_teacher`` trained, so it runs after it.

    Args:
        out: the output JSON file.
        scenarios: names of :data:`SCENARIOS` (default: all).
        work_dir: folder for the phantoms and the runs (default: a temporary folder).
    """
    names = list(scenarios or SCENARIOS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        data = _data(work)
        traces = {}
        for name in names:
            bundle, config, datalist, overrides = SCENARIOS[name]
            run = work / "runs" / name
            overrides = {**_COMMON, **overrides, "dataset_dir": str(data[bundle]),
                         "datalist": str(data[bundle] / datalist), "ckpt_dir": str(run / "models"),
                         "output_dir": str(run / "eval")}
            if bundle == "cdugjl_liver":  # the teacher of liver_teacher (its default place under its ckpt_dir)
                overrides["teacher_ckpt"] = str(work / "runs" / "liver_teacher" / "models" / "teacher" / "model.pt")
            trace = run / "losses.json"
            run.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "one", bundle, config, json.dumps(overrides), str(trace)]
            proc = subprocess.run(cmd, cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                errors = [line for line in proc.stderr.splitlines() if "Error" in line]
                raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}\n" + "\n".join(errors[:10]))
            traces[name] = json.loads(trace.read_text())
            print(f"{name}: {len(traces[name])} iterations, last loss {traces[name][-1]:.6f}", flush=True)
    Path(out).write_text(json.dumps(traces, indent=1) + "\n")


def compare(before: str, after: str, tolerance: float = 1e-5) -> None:
    """The largest absolute difference of the per-iteration losses of each scenario in both files.

    Args:
        before: a JSON file written by :func:`record`.
        after: another.
        tolerance: differences above it are reported as ``changed``.

    Prints ``max |before - after|`` per scenario found in both files (``inf`` when the iteration counts differ).
    """
    a, b = json.loads(Path(before).read_text()), json.loads(Path(after).read_text())
    for name in [n for n in a if n in b]:
        if len(a[name]) != len(b[name]):
            diff = float("inf")
        else:
            diff = max(abs(x - y) for x, y in zip(a[name], b[name]))
        print(f"{name}: max |difference| {diff:.3g} ({'same' if diff <= tolerance else 'changed'})")


if __name__ == "__main__":
    fire.Fire({"record": record, "compare": compare, "one": one})
