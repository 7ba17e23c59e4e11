"""The ``iteration`` and ``profile`` benchmarks of ``scripts/benchmark_speed.py``: one training iteration of each
method against supervised-only training, and where a supervised iteration's time goes."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import phantoms
import torch
from ignite.engine import Events
from benchmark_accuracy import METHODS
from speed_common import (DEFAULT_OUT_DIR, bundle_config, environment, median_of, ratio_of, set_threads,
                          write_and_print)

# the benchmark's methods (benchmark_accuracy.METHODS); CEDS's semi-supervised methods in their semi-supervised phase
_SEMI_PHASE = {"warmup": 0, "confidence_interval": 0}
ITERATION_METHODS = {
    bundle: {m: {**o, **(_SEMI_PHASE if bundle == "ceds_mediastinum" and m != "supervised" else {})}
             for m, o in methods.items()}
    for bundle, methods in METHODS.items()
}
"""Config overrides of every method, per bundle; ``supervised`` is the reference of the ratios."""



class IterationTimer:
    """Times the iterations of an ignite engine.

    ``iteration`` runs from ``GET_BATCH_COMPLETED`` (the labelled batch is in hand) to ``ITERATION_COMPLETED``
    (after the handlers attached before this timer, e.g. the EMA update); ``step`` also includes fetching the
    labelled batch (from ``GET_BATCH_STARTED``).
    """

    def __init__(self) -> None:
        self.iteration_s: list[float] = []
        self.step_s: list[float] = []
        self._fetch = self._start = 0.0

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._fetching)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    def _fetching(self, engine: Any) -> None:
        self._fetch = time.perf_counter()

    def _started(self, engine: Any) -> None:
        self._start = time.perf_counter()

    def _completed(self, engine: Any) -> None:
        end = time.perf_counter()
        self.iteration_s.append(end - self._start)
        self.step_s.append(end - self._fetch)


def phantom_datalists(data_dir: str, n_cases: int = 8, label_ratio: float = 0.5) -> dict[str, str]:
    """Phantom datasets for both bundles in ``data_dir/liver`` and ``data_dir/ct`` (reused if present).

    Args:
        data_dir: parent folder.
        n_cases: cases per dataset (8 gives 2 test, 2 validation and 4 training cases).
        label_ratio: labelled fraction of the training cases (the rest are unlabelled).

    Returns:
        ``{"cdugjl_liver": datalist path, "ceds_mediastinum": datalist path}``.
    """
    paths = {}
    for bundle, sub, generator in (("cdugjl_liver", "liver", phantoms.liver_mri),
                                   ("ceds_mediastinum", "ct", phantoms.mediastinal_ct)):
        folder = Path(data_dir) / sub
        if not (folder / "dataset.json").is_file():
            generator(str(folder), n_cases=n_cases, seed=0)
        datalist = folder / f"datalist_{int(round(100 * label_ratio))}.json"
        paths[bundle] = str(datalist) if datalist.is_file() else phantoms.datalist(str(folder), label_ratio, seed=0)
    return paths


def build_trainer(
    bundle: str,
    method: str,
    datalist: str,
    work_dir: str,
    epoch_length: int,
    seed: int = 0,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """``train#trainer`` of ``train.json`` + ``cpu_demo.json`` for one epoch of ``epoch_length`` iterations.

    The method's overrides (:data:`ITERATION_METHODS`) are applied, checkpoints and logs go to ``work_dir``,
    validation is pushed beyond the run, and a method with a frozen teacher gets a randomly initialised one saved
    to ``teacher_ckpt``.

    Args:
        bundle: bundle folder name.
        method: a key of ``ITERATION_METHODS[bundle]``.
        datalist: the datalist (with "training" and "unlabeled" splits).
        work_dir: folder for checkpoints, logs and the random teacher.
        epoch_length: iterations of the epoch.
        seed: determinism seed.
        device: the configs' ``device`` (default: theirs).
        overrides: further config overrides, applied before the method's (e.g. ``{"roi_size": [32, 32]}``).

    Returns:
        the ignite engine, not yet run.
    """
    from monai.utils import set_determinism

    out = Path(work_dir) / bundle / method
    overrides = {
        "dataset_dir": str(Path(datalist).parent),
        "datalist": str(datalist),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "eval"),
        "val_interval": 10**6,
        "num_workers": 0,
        "train#trainer#max_epochs": 1,
        "train#trainer#epoch_length": epoch_length,
        **(overrides or {}),
        **ITERATION_METHODS[bundle][method],
    }
    if device is not None:
        overrides["device"] = device
    parser = bundle_config(bundle, ["train.json", "cpu_demo.json"], **overrides)
    set_determinism(seed=seed)
    if "teacher_def" in parser and parser.get_parsed_content("use_teacher"):
        teacher_ckpt = Path(parser.get_parsed_content("teacher_ckpt"))
        teacher_ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save(parser.get_parsed_content("teacher_def").state_dict(), teacher_ckpt)
    return parser.get_parsed_content("train#trainer")


def _datalists(bundles: Sequence[str], datalists: dict[str, str] | None, data_dir: str) -> dict[str, str]:
    """``{bundle: datalist}``: the given ones, and phantom datalists in ``data_dir`` for the bundles without one."""
    paths = dict(datalists or {})
    if any(b not in paths for b in bundles):
        paths = {**phantom_datalists(data_dir), **paths}
    return {b: paths[b] for b in bundles}


def time_iterations(
    bundle: str,
    method: str,
    datalist: str,
    work_dir: str,
    iterations: int,
    warmup: int,
    seed: int = 0,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one epoch of :func:`build_trainer` and time its iterations.

    Args:
        bundle, method, datalist, work_dir, seed, device, overrides: as :func:`build_trainer`.
        iterations: timed iterations.
        warmup: untimed iterations first.

    Returns:
        the raw times (``iteration_s``, ``step_s``, ``warmup_s``), and the labelled and unlabelled samples per
        iteration (``labelled_batch``; ``unlabelled_batch``: the student's input rows per iteration minus it).
    """
    trainer = build_trainer(bundle, method, datalist, work_dir, warmup + iterations, seed, device, overrides)
    timer = IterationTimer()
    timer.attach(trainer)
    sizes = {"labelled": 0, "student": 0, "this_iteration": 0}

    def count_labelled(engine: Any) -> None:
        sizes["labelled"] = max(sizes["labelled"], int(engine.state.batch["image"].shape[0]))
        sizes["this_iteration"] = 0

    def count_student(module: torch.nn.Module, args: tuple) -> None:
        # the liver student runs labelled rows and strong views in two passes: add up the passes of an iteration
        sizes["this_iteration"] += int(args[0].shape[0])
        sizes["student"] = max(sizes["student"], sizes["this_iteration"])

    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, count_labelled)
    hook = trainer.network.register_forward_pre_hook(count_student)
    trainer.run()
    hook.remove()
    return {
        "iteration_s": timer.iteration_s[warmup:],
        "step_s": timer.step_s[warmup:],
        "warmup_s": timer.iteration_s[:warmup],
        "labelled_batch": sizes["labelled"],
        "unlabelled_batch": sizes["student"] - sizes["labelled"],
    }


def iteration(
    bundles: Sequence[str] = ("ceds_mediastinum", "cdugjl_liver"),
    methods: Sequence[str] | None = None,
    iterations: int = 10,
    warmup: int = 2,
    data_dir: str | None = None,
    datalists: dict[str, str] | None = None,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    threads: int | None = None,
    out_dir: str = DEFAULT_OUT_DIR,
    tag: str = "",
) -> str:
    """Training-iteration time of every method against supervised-only training, per bundle.

    Args:
        bundles: the bundles to benchmark.
        methods: the methods to time (default: all of :data:`ITERATION_METHODS`); ``supervised``, the reference of
            the ratios, is always timed first.
        iterations: timed iterations per method.
        warmup: untimed iterations first (data caching, lazy loading of the teacher).
        data_dir: where the phantom datasets are written or found (``<data_dir>/liver``, ``<data_dir>/ct``);
            default: a temporary folder, removed afterwards.
        datalists: ``{bundle: datalist path}`` to use instead of phantoms (needs "training" and "unlabeled").
        device: the configs' ``device`` (default: theirs, CUDA if available).
        overrides: config overrides for every bundle and method, e.g. ``{"num_samples": 2}`` (the methods' own
            overrides win).
        seed: determinism seed.
        threads: ``torch.set_num_threads``.
        out_dir: folder of the JSON result.
        tag: suffix of the file name.

    Returns:
        the path of the JSON result.
    """
    set_threads(threads)
    settings = {k: v for k, v in locals().items() if k not in ("out_dir", "tag")}
    settings.update(bundles=list(bundles), methods=None if methods is None else list(methods))
    unknown = [m for m in methods or [] if not any(m in ITERATION_METHODS[b] for b in bundles)]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: { {b: list(ITERATION_METHODS[b]) for b in bundles} }")
    env = environment()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _datalists(bundles, datalists, data_dir or str(Path(tmp) / "data"))
        settings["datalists"] = {b: str(p) for b, p in paths.items()}
        for bundle in bundles:
            reference = None
            chosen = [m for m in ITERATION_METHODS[bundle] if m == "supervised" or methods is None or m in methods]
            for method in chosen:
                measured = time_iterations(
                    bundle, method, paths[bundle], tmp, iterations, warmup, seed, device, overrides
                )
                iteration_s, step_s = median_of(measured["iteration_s"]), median_of(measured["step_s"])
                fastest = min(measured["iteration_s"], default=None)
                if method == "supervised":
                    reference = (iteration_s, step_s, fastest)
                rows.append({
                    "bundle": bundle, "method": method, "iteration_s": iteration_s, "step_s": step_s,
                    "ratio": ratio_of(iteration_s, reference[0]), "step_ratio": ratio_of(step_s, reference[1]),
                    "iteration_min_s": fastest, "min_ratio": ratio_of(fastest, reference[2]),
                    "iteration_times_s": measured["iteration_s"], "step_times_s": measured["step_s"],
                    "warmup_times_s": measured["warmup_s"], "labelled_batch": measured["labelled_batch"],
                    "unlabelled_batch": measured["unlabelled_batch"],
                })
    return write_and_print("iteration", rows, settings, out_dir, tag, env,
                           "training iteration (ratio: method / supervised; target <= 2.5)",
                           ["bundle", "method", "iteration_s", "ratio", "step_s", "step_ratio", "iteration_min_s",
                            "min_ratio", "labelled_batch", "unlabelled_batch"])


class IterationProfiler:
    """Splits each training iteration of an ignite engine into phases, with ignite and forward-hook events.

    Phases (seconds per iteration): ``data`` (``GET_BATCH_STARTED`` -> ``GET_BATCH_COMPLETED``: the labelled batch
    from the data loader), ``prepare`` (``ITERATION_STARTED`` -> the student's first forward: moving the batch,
    the unlabelled batch, the teacher and EMA passes), ``forward`` (the student's forward passes), ``between``
    (after the last student forward until ``FORWARD_COMPLETED``), ``loss`` (-> ``LOSS_COMPLETED``), ``backward``
    (-> ``BACKWARD_COMPLETED``), ``optimiser`` (-> ``MODEL_COMPLETED``: optimiser and scheduler steps) and
    ``handlers`` (-> ``ITERATION_COMPLETED``: EMA updates and the other handlers attached before the profiler).
    """

    PHASES = ("data", "prepare", "forward", "between", "loss", "backward", "optimiser", "handlers")

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {p: [] for p in self.PHASES}
        self._marks: dict[str, float] = {}
        self._forward = 0.0

    def attach(self, engine: Any) -> None:
        from monai.engines.utils import IterationEvents

        for event, mark in ((Events.GET_BATCH_STARTED, "fetch"), (Events.GET_BATCH_COMPLETED, "fetched"),
                            (Events.ITERATION_STARTED, "start"), (IterationEvents.FORWARD_COMPLETED, "forward_done"),
                            (IterationEvents.LOSS_COMPLETED, "loss_done"),
                            (IterationEvents.BACKWARD_COMPLETED, "backward_done"),
                            (IterationEvents.MODEL_COMPLETED, "model_done")):
            engine.add_event_handler(event, self._mark, mark)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)
        engine.network.register_forward_pre_hook(self._forward_started)
        engine.network.register_forward_hook(self._forward_ended)

    def _mark(self, engine: Any, name: str) -> None:
        self._marks[name] = time.perf_counter()
        if name == "start":
            self._forward = 0.0
            self._marks.pop("first_forward", None)

    def _forward_started(self, module: torch.nn.Module, args: tuple) -> None:
        now = time.perf_counter()
        self._marks.setdefault("first_forward", now)
        self._marks["forward_start"] = now

    def _forward_ended(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        now = time.perf_counter()
        self._forward += now - self._marks["forward_start"]
        self._marks["last_forward"] = now

    def _completed(self, engine: Any) -> None:
        m, end = self._marks, time.perf_counter()
        self.times["data"].append(m["fetched"] - m["fetch"])
        self.times["prepare"].append(m["first_forward"] - m["start"])
        self.times["forward"].append(self._forward)
        self.times["between"].append(m["forward_done"] - m["last_forward"])
        self.times["loss"].append(m["loss_done"] - m["forward_done"])
        self.times["backward"].append(m["backward_done"] - m["loss_done"])
        self.times["optimiser"].append(m["model_done"] - m["backward_done"])
        self.times["handlers"].append(end - m["model_done"])


def network_forward_backward(network: torch.nn.Module, image: torch.Tensor, repeats: int) -> list[float]:
    """Times of the network's own forward + backward on ``image`` (train mode; the sum of every float output).

    Args:
        network: the student (a DDP wrapper is not expected).
        image: an input batch, e.g. the trainer's last labelled batch.
        repeats: timed repeats (after one untimed).

    Returns:
        the wall time of each repeat in seconds.
    """
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    network.train()

    def outputs(value: Any) -> list[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            return [value] if value.is_floating_point() and value.requires_grad else []
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
        return [t for v in items for t in outputs(v)]

    times = []
    for i in range(repeats + 1):
        network.zero_grad(set_to_none=True)
        start = time.perf_counter()
        sum(t.float().sum() for t in outputs(network(image))).backward()
        if i:
            times.append(time.perf_counter() - start)
    network.zero_grad(set_to_none=True)
    return times


def profile(
    bundles: Sequence[str] = ("ceds_mediastinum", "cdugjl_liver"),
    methods: Sequence[str] = ("supervised",),
    iterations: int = 20,
    warmup: int = 3,
    data_dir: str | None = None,
    datalists: dict[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    threads: int | None = 1,
    out_dir: str = DEFAULT_OUT_DIR,
    tag: str = "",
) -> str:
    """Where a training iteration's time goes, against the network's own forward + backward on the same batch.

    Each (bundle, method) runs :func:`build_trainer` for ``warmup + iterations`` iterations under an
    :class:`IterationProfiler`; then the student's forward + backward alone is timed ``iterations`` times on the
    last labelled batch (:func:`network_forward_backward`). Rows hold the median of every phase, ``step_s`` (the
    median of the iterations' sums, data included), ``network_s`` (the network's own median), the data share
    ``data_share = data / step`` (target <= 0.2) and ``step_ratio = step_s / network_s`` (target <= 2 for
    ``supervised``).

    Args:
        bundles: the bundles to profile.
        methods: keys of :data:`ITERATION_METHODS`.
        iterations: profiled iterations (and network repeats).
        warmup: iterations first, not counted.
        data_dir: where the phantom datasets are written or found (default: a temporary folder).
        datalists: ``{bundle: datalist path}`` to use instead of phantoms.
        overrides: ``{bundle: {config id: value}}`` for ``train.json`` + ``cpu_demo.json``.
        seed: determinism seed.
        threads: ``torch.set_num_threads`` (default 1: comparable whatever else runs on the machine).
        out_dir: folder of the JSON result.
        tag: suffix of the file name.

    Returns:
        the path of the JSON result (``profile[_<tag>].json``).
    """
    set_threads(threads)
    settings = {k: v for k, v in locals().items() if k not in ("out_dir", "tag")}
    settings.update(bundles=list(bundles), methods=list(methods))
    env = environment()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _datalists(bundles, datalists, data_dir or str(Path(tmp) / "data"))
        settings["datalists"] = {b: str(p) for b, p in paths.items()}
        for bundle in bundles:
            for method in methods:
                trainer = build_trainer(bundle, method, paths[bundle], tmp, warmup + iterations, seed,
                                        overrides=(overrides or {}).get(bundle))
                profiler = IterationProfiler()
                profiler.attach(trainer)
                last: dict[str, torch.Tensor] = {}
                trainer.add_event_handler(Events.GET_BATCH_COMPLETED,
                                          lambda e: last.update(image=e.state.batch["image"]))
                trainer.run()
                phases = {p: median_of(t[warmup:]) for p, t in profiler.times.items()}
                steps = [sum(t[i] for t in profiler.times.values()) for i in range(warmup, warmup + iterations)]
                network_s = median_of(network_forward_backward(trainer.network, last["image"], iterations))
                step_s = median_of(steps)
                rows.append({
                    "bundle": bundle, "method": method, "batch_shape": list(last["image"].shape),
                    **{f"{p}_s": v for p, v in phases.items()}, "step_s": step_s, "network_s": network_s,
                    "data_share": ratio_of(phases["data"], step_s), "step_ratio": ratio_of(step_s, network_s),
                    "phase_times_s": {p: t[warmup:] for p, t in profiler.times.items()},
                })
    return write_and_print("profile", rows, settings, out_dir, tag, env,
                           "training-iteration profile (targets: data_share <= 0.2; supervised step_ratio <= 2)",
                           ["bundle", "method", *[f"{p}_s" for p in IterationProfiler.PHASES], "step_s", "network_s",
                            "data_share", "step_ratio"])
