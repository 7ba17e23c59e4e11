"""Speed and memory benchmarks of the two bundles: selective scan, training iteration and full-volume inference.

Three benchmarks, each a subcommand that writes one JSON file ``<out_dir>/<benchmark>[_<tag>].json`` and prints a
short table:

- ``scan``: the pure-PyTorch chunked selective scan of the liver bundle
  (``bundles/cdugjl_liver/scripts/selective_scan.py``: ``selective_scan_chunked``) against its sequential reference
  ``selective_scan_ref``, forward + backward (``y.sum().backward()``) with the arguments MEAMT-Net's Mamba passes
  (``D``, ``z``, ``delta_bias``, ``delta_softplus=True``; ``A = -(1..N)``, step sizes in [0.001, 0.1]). Before any
  timing the two are checked to agree (outputs and every gradient, ``|a - b| <= atol + rtol * max|a|``, 1e-4
  each). With CUDA and ``mamba_ssm`` importable, ``mamba_ssm``'s ``selective_scan_fn`` is also compared with the
  chunked scan on the GPU; otherwise that row says ``"skipped: ..."``.
- ``iteration``: the time of one training iteration of each method against supervised-only training of the same
  network, through the real bundle configs (``configs/train.json`` + ``configs/cpu_demo.json``, read with
  ``monai.bundle.ConfigParser``) on phantom data (``scripts/phantoms.py``): the ``train#trainer`` engine runs one
  epoch of ``warmup + iterations`` iterations and every iteration is timed with ignite events; the first
  ``warmup`` are discarded. ``ceds_mediastinum``: ``supervised``, ``mean_teacher`` and ``ceds`` (the latter two in
  their semi-supervised phase: ``warmup 0``, ``confidence_interval 0``). ``cdugjl_liver``: ``supervised``
  (every SSL weight 0), ``mean_teacher`` (distillation weights 0, ``uncertainty_mask false``) and ``cdugjl``
  (the config's defaults, with a randomly initialised frozen teacher saved to ``teacher_ckpt``).
- ``inference``: full-volume inference of each bundle's network against a MONAI baseline under the same
  sliding-window settings: ``CEDSNet`` as ``configs/inference.json`` runs it (segmentation + confidence,
  ``scripts.inference.SegmentationWithConfidence``) against ``monai.networks.nets.VNet``, both through
  ``SlidingWindowInferer`` on a CT-sized volume (default 512 x 512 x 300); ``MEAMTNet`` through the bundle's
  ``SliceQuantInferer`` against a 2D ``monai.networks.nets.UNet`` of the same widths through ``SliceInferer`` (one
  whole, zero-padded slice per window, same slice batch) on a multi-sequence MRI volume (default 2 x 256 x 256 x 40).
  Network widths: ``cpu_demo`` (``configs/cpu_demo.json``) and/or ``paper`` (``configs/inference.json``); the
  sliding-window settings come from ``configs/inference.json`` unless given.
- ``all``: the three with their defaults.

Command line (python-fire)::

    python scripts/benchmark_speed.py scan [--lengths "[256,1024,4096,16384]"] [--repeats 5]
    python scripts/benchmark_speed.py iteration [--iterations 10] [--bundles "['cdugjl_liver']"]
    python scripts/benchmark_speed.py inference [--ct_shape "[512,512,300]"] [--ct_window_batches None]
    python scripts/benchmark_speed.py all [--out_dir docs/benchmarks/results/speed] [--tag h100]

Timing: ``time.perf_counter`` wall time; medians over the repeats, after warm-up runs. Everything is float32;
``inference`` runs on the CPU, ``iteration`` on the configs' device (CUDA if available). Other processes sharing
the cores make CPU timings noisy: compare ratios measured in the same run. When other jobs keep the cores busy,
``--threads 1`` avoids PyTorch's multi-threaded operations waiting for a descheduled thread, which slows code made
of many small operations (the scans) far more than convolutions.

Memory: peak resident set size (RSS) of a fresh process per measurement (spawned with ``multiprocessing``), read
from ``VmHWM`` in ``/proc/self/status``. ``resource.getrusage(...).ru_maxrss`` is not used: on Linux a child
process inherits its parent's high-water mark across ``fork``/``exec``, so it over-reports. The high-water mark is
reset (``/proc/self/clear_refs``) before the measured part, so ``*_peak_mb`` of ``scan`` is the increase of RSS
during the forward + backward passes over the inputs already in memory, and ``inference``'s ``peak_rss_gb`` is the
whole process's peak (Python, PyTorch, the network, the volume and the inference). On other systems the
``ru_maxrss`` of the fresh process is reported instead.

CT extrapolation: a CPU cannot run a 3D V-Net over 512 x 512 x 300 voxels in minutes, so by default the CT
networks run for real on the first ``ct_window_batches`` sliding-window batches only; every later batch is served
by the last real output (same shapes, so the inferer still allocates, aggregates and normalises the whole volume
for real: the peak RSS is that of a full run). The reported time is then the measured wall time plus, for every
served batch, the mean real forward time (the first, which pays one-off costs, left out when there are more):
``time_s = wall_s + served_batches * forward_s_mean`` (``extrapolated``
is true in such rows). ``--ct_window_batches None`` runs every window for real.

JSON schema (every file)::

    {"benchmark": "scan" | "iteration" | "inference",
     "command": "the exact command line",
     "environment": {"date_utc", "python", "torch", "monai", "platform", "cpu", "cpu_count", "torch_threads",
                     "load_average", "cuda", "gpu"},
     "settings": {the arguments of the subcommand},
     "rows": [{flat keys, see below}]}

Rows (times in seconds, lists are the raw timings of the repeats / iterations):

- scan: ``device``, ``method``, ``baseline``, ``status`` ("ok" or "skipped: ..."), ``length``, ``batch``,
  ``d_inner``, ``d_state``, ``chunk_size``, ``time_s``, ``baseline_time_s`` (medians), ``speedup``
  (``baseline_time_s / time_s``), ``times_s``, ``baseline_times_s``, ``peak_mb``, ``baseline_peak_mb``,
  ``max_abs_error``. CPU rows: method "chunked", baseline "ref"; GPU row: method "mamba_ssm", baseline "chunked"
  (peak memory there is ``torch.cuda.max_memory_allocated``).
- iteration: ``bundle``, ``method``, ``iteration_s`` (median, from the labelled batch in hand to the end of the
  iteration's handlers; unlabelled batches are drawn inside the iteration), ``step_s`` (median, including fetching
  the labelled batch), ``ratio`` (``iteration_s / iteration_s`` of ``supervised``), ``step_ratio``,
  ``iteration_min_s`` and ``min_ratio`` (the fastest iteration and its ratio: robust to other jobs stalling some
  iterations), ``iteration_times_s``, ``step_times_s`` (timed iterations only), ``warmup_times_s``,
  ``labelled_batch`` and ``unlabelled_batch`` (samples per iteration).
- inference: ``bundle``, ``volume`` ("ct" | "mri"), ``shape`` (channels first), ``widths`` ("cpu_demo" |
  "paper"), ``channels``, ``network``, ``baseline``, ``inferer``, ``roi_size``, ``sw_batch_size``, ``overlap``,
  ``time_s``, ``baseline_time_s`` (medians), ``time_ratio``, ``peak_rss_gb``, ``baseline_peak_rss_gb``,
  ``times_s``, ``baseline_times_s``, ``extrapolated``, ``baseline_extrapolated``, ``total_batches``,
  ``real_batches``, ``baseline_real_batches``.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fire
import phantoms
import torch
from ignite.engine import Events
from benchmark_accuracy import METHODS
from bundle_imports import bundle_module, use_bundle

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = "docs/benchmarks/results/speed"
SCAN_TOLERANCE = 1e-4
VNET_CHANNELS = [16, 32, 64, 128, 256]
"""The fixed widths of ``monai.networks.nets.VNet`` (recorded in the inference rows)."""
# the benchmark's methods (benchmark_accuracy.METHODS); CEDS's semi-supervised methods in their semi-supervised phase
_SEMI_PHASE = {"warmup": 0, "confidence_interval": 0}
ITERATION_METHODS = {
    bundle: {m: {**o, **(_SEMI_PHASE if bundle == "ceds_mediastinum" and m != "supervised" else {})}
             for m, o in methods.items()}
    for bundle, methods in METHODS.items()
}
"""Config overrides of every method, per bundle; ``supervised`` is the reference of the ratios."""


# ---------------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------------


def bundle_config(bundle: str, configs: Sequence[str], **overrides: Any) -> Any:
    """A ``monai.bundle.ConfigParser`` of the bundle's ``configs`` (later files overlay earlier ones).

    ``bundle_root`` is set to the absolute bundle folder and the bundle's ``scripts`` is made importable.

    Args:
        bundle: bundle folder name.
        configs: file names in ``bundles/<bundle>/configs``, e.g. ``["train.json", "cpu_demo.json"]``.
        overrides: config ids and values to set (``#`` separated ids given as ``{"a#b": v}`` via ``**``).

    Returns:
        the parser (nothing instantiated yet).
    """
    from monai.bundle import ConfigParser

    root = use_bundle(bundle)
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / c) for c in configs])
    parser["bundle_root"] = str(root)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _status_kb(key: str) -> int | None:
    """A ``kB`` value of ``/proc/self/status`` (e.g. ``VmHWM``), or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> float:
    """Reset the RSS high-water mark of this process (Linux ``clear_refs``); returns the current RSS in bytes.

    Where the reset is unavailable the high-water mark is left as it is (and 0.0 is returned).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return 0.0
    return float(_status_kb("VmRSS") or 0) * 1024


def peak_rss() -> float:
    """Peak RSS of this process in bytes: ``VmHWM`` (Linux), else ``ru_maxrss`` (see the module docstring)."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return float(hwm) * 1024
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(maxrss) if sys.platform == "darwin" else float(maxrss) * 1024


def run_isolated(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in a fresh spawned process (independent memory peak) and return its result."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Where and when the benchmark ran: versions, CPU, threads, load, GPU."""
    import monai

    cuda = torch.cuda.is_available()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def _command() -> str:
    return shlex.join([os.path.basename(sys.executable), *sys.argv])


def write_result(
    benchmark: str, rows: list[dict], settings: dict[str, Any], out_dir: str, tag: str, env: dict[str, Any]
) -> str:
    """Write ``<out_dir>/<benchmark>[_<tag>].json`` with the schema of the module docstring; returns its path."""
    path = Path(out_dir) / (f"{benchmark}_{tag}.json" if tag else f"{benchmark}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": benchmark, "command": _command(), "environment": env, "settings": settings, "rows": rows}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return str(path)


def print_table(title: str, rows: list[dict], columns: Sequence[str]) -> None:
    """Print ``columns`` of ``rows`` as a fixed-width table (floats with 4 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    table = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    print(f"\n{title}")
    for i, line in enumerate(table):
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


# ---------------------------------------------------------------------------------------------------------------
# scan
# ---------------------------------------------------------------------------------------------------------------


def scan_inputs(
    length: int, batch: int = 2, d_inner: int = 64, d_state: int = 16, seed: int = 0, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Selective-scan arguments shaped and scaled as MEAMT-Net's Mamba produces them.

    ``A = -(1, ..., N)`` per channel (S4D-real), ``delta_bias`` the inverse softplus of step sizes log-uniform in
    [0.001, 0.1], ``D`` ones, the rest standard normal (``delta`` scaled by 0.5).

    Args:
        length: tokens ``L``.
        batch: batch size ``B``.
        d_inner: channels ``D``.
        d_state: state size ``N``.
        seed: random seed.
        device: where to create them.

    Returns:
        ``u``, ``delta``, ``z`` [B, D, L]; ``A`` [D, N]; ``B``, ``C`` [B, N, L]; ``D``, ``delta_bias`` [D].
    """
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(d_inner, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    inputs = {
        "u": torch.randn(batch, d_inner, length, generator=g),
        "delta": 0.5 * torch.randn(batch, d_inner, length, generator=g),
        "A": -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1),
        "B": torch.randn(batch, d_state, length, generator=g),
        "C": torch.randn(batch, d_state, length, generator=g),
        "D": torch.ones(d_inner),
        "z": torch.randn(batch, d_inner, length, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }
    return {k: v.to(device) for k, v in inputs.items()}


def _scan_function(impl: str) -> Callable[..., torch.Tensor]:
    """The selective scan ``impl`` ("ref", "chunked" or "mamba_ssm"); ``mamba_ssm`` is imported only here."""
    if impl == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn
    scan = bundle_module("cdugjl_liver", "selective_scan")
    return {"ref": scan.selective_scan_ref, "chunked": scan.selective_scan_chunked}[impl]


def scan_forward_backward(
    impl: str, inputs: dict[str, torch.Tensor], chunk_size: int = 64
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward (``y.sum().backward()``) of the scan ``impl`` on fresh leaf copies of ``inputs``.

    Args:
        impl: "ref", "chunked" or "mamba_ssm".
        inputs: the arguments from :func:`scan_inputs`.
        chunk_size: tokens per chunk of the chunked scan.

    Returns:
        the output ``y`` [B, D, L] (detached) and the gradient of every input.
    """
    fn = _scan_function(impl)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    kwargs = {"chunk_size": chunk_size} if impl == "chunked" else {}
    y = _call_scan(fn, leaves, **kwargs)
    y.sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def _call_scan(fn: Callable[..., torch.Tensor], x: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    return fn(
        x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], delta_bias=x["delta_bias"],
        delta_softplus=True, **kwargs,
    )


def scan_agreement(
    impl: str, baseline: str, inputs: dict[str, torch.Tensor], chunk_size: int = 64, tol: float = SCAN_TOLERANCE
) -> float:
    """Check that two scans agree on ``inputs`` (output and all gradients); returns the largest abs difference.

    Raises:
        AssertionError: some ``|a - b| > tol + tol * max|a|`` (``a`` the baseline's tensor).
    """
    y_a, grads_a = scan_forward_backward(baseline, inputs, chunk_size)
    y_b, grads_b = scan_forward_backward(impl, inputs, chunk_size)
    worst = 0.0
    for name, a, b in [("y", y_a, y_b), *[(f"grad {k}", grads_a[k], grads_b[k]) for k in grads_a]]:
        err = float((a.float() - b.float()).abs().max())
        bound = tol + tol * float(a.abs().max())
        if not err <= bound:
            raise AssertionError(f"{impl} and {baseline} scans differ in {name} at L={a.shape[-1]}: {err} > {bound}")
        worst = max(worst, err)
    return worst


def scan_worker(
    impl: str,
    length: int,
    batch: int,
    d_inner: int,
    d_state: int,
    chunk_size: int,
    repeats: int,
    warmup: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time forward + backward of one CPU scan and measure its RSS increase (run in a fresh process).

    Returns:
        ``times_s`` (the timed repeats) and ``peak_mb`` (peak RSS over the resident inputs, MiB).
    """
    _set_threads(threads)
    inputs = scan_inputs(length, batch, d_inner, d_state)
    scan_forward_backward(impl, scan_inputs(8, batch, d_inner, d_state), chunk_size)  # imports, lazy init
    start_rss = reset_peak_rss()
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        scan_forward_backward(impl, inputs, chunk_size)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = peak_rss() - start_rss if start_rss else peak_rss()
    return {"times_s": times, "peak_mb": peak / 2**20}


def _scan_gpu_row(length: int, batch: int, d_inner: int, d_state: int, chunk_size: int, repeats: int, warmup: int):
    """``mamba_ssm.selective_scan_fn`` against the chunked scan on CUDA, or a ``skipped`` row."""
    row: dict[str, Any] = {"device": "cuda", "method": "mamba_ssm", "baseline": "chunked", "length": length,
                           "batch": batch, "d_inner": d_inner, "d_state": d_state, "chunk_size": chunk_size}
    if not torch.cuda.is_available():
        return {**row, "status": "skipped: no CUDA"}
    try:
        _scan_function("mamba_ssm")
    except Exception as e:  # ImportError, or a broken build raising anything else at import time
        return {**row, "status": f"skipped: mamba_ssm not importable ({type(e).__name__})"}
    inputs = scan_inputs(length, batch, d_inner, d_state, device="cuda")
    row["max_abs_error"] = scan_agreement("mamba_ssm", "chunked", inputs, chunk_size, tol=1e-3)
    measured = {}
    for impl in ("mamba_ssm", "chunked"):
        times = []
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for i in range(warmup + repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            scan_forward_backward(impl, inputs, chunk_size)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        measured[impl] = (times, (torch.cuda.max_memory_allocated() - base) / 2**20)
    (times, peak), (base_times, base_peak) = measured["mamba_ssm"], measured["chunked"]
    return {**row, "status": "ok", "time_s": _median(times), "baseline_time_s": _median(base_times),
            "speedup": _ratio(_median(base_times), _median(times)), "times_s": times, "baseline_times_s": base_times,
            "peak_mb": peak, "baseline_peak_mb": base_peak}


def scan(
    lengths: Sequence[int] = (256, 1024, 4096, 16384),
    batch: int = 2,
    d_inner: int = 64,
    d_state: int = 16,
    chunk_size: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    gpu_length: int = 4096,
    threads: int | None = None,
    out_dir: str = DEFAULT_OUT_DIR,
    tag: str = "",
) -> str:
    """Chunked vs. sequential selective scan on the CPU (and ``mamba_ssm`` vs. chunked on a GPU, if any).

    Args:
        lengths: sequence lengths ``L`` (the reference takes a few seconds per repeat at 16384).
        batch: batch size ``B``.
        d_inner: channels ``D``. For scale: MEAMT-Net's bottleneck Mamba has ``D = 2 * channels[4]`` (512 at
            cpu_demo widths, 2048 at paper widths) and ``L = H * W / 256`` tokens per slice.
        d_state: state size ``N``.
        chunk_size: tokens per chunk of the chunked scan (the bundle's default, 64).
        repeats: timed runs per implementation and length (median reported).
        warmup: untimed runs first.
        gpu_length: ``L`` of the GPU comparison.
        threads: ``torch.set_num_threads`` (default: PyTorch's choice).
        out_dir: folder of the JSON result.
        tag: suffix of the file name (``scan_<tag>.json``).

    Returns:
        the path of the JSON result.
    """
    _set_threads(threads)
    settings = {k: v for k, v in locals().items() if k not in ("out_dir", "tag")}
    settings["lengths"] = [int(n) for n in lengths]
    env = environment()
    rows = []
    for length in settings["lengths"]:
        error = scan_agreement("chunked", "ref", scan_inputs(length, batch, d_inner, d_state), chunk_size)
        shape = dict(length=length, batch=batch, d_inner=d_inner, d_state=d_state, chunk_size=chunk_size)
        measured = {
            impl: run_isolated(scan_worker, impl, repeats=repeats, warmup=warmup, threads=threads, **shape)
            for impl in ("chunked", "ref")
        }
        chunked, ref = measured["chunked"], measured["ref"]
        time_s, base_s = _median(chunked["times_s"]), _median(ref["times_s"])
        rows.append({"device": "cpu", "method": "chunked", "baseline": "ref", "status": "ok", **shape,
                     "time_s": time_s, "baseline_time_s": base_s, "speedup": _ratio(base_s, time_s),
                     "times_s": chunked["times_s"], "baseline_times_s": ref["times_s"],
                     "peak_mb": chunked["peak_mb"], "baseline_peak_mb": ref["peak_mb"], "max_abs_error": error})
    rows.append(_scan_gpu_row(gpu_length, batch, d_inner, d_state, chunk_size, repeats, warmup))
    path = write_result("scan", rows, settings, out_dir, tag, env)
    print_table("selective scan, forward + backward (time_s: chunked / mamba_ssm, baseline: ref / chunked)", rows,
                ["device", "length", "method", "baseline", "time_s", "baseline_time_s", "speedup", "peak_mb",
                 "baseline_peak_mb", "status"])
    print(f"-> {path}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# iteration
# ---------------------------------------------------------------------------------------------------------------


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
    _set_threads(threads)
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
                iteration_s, step_s = _median(measured["iteration_s"]), _median(measured["step_s"])
                fastest = min(measured["iteration_s"], default=None)
                if method == "supervised":
                    reference = (iteration_s, step_s, fastest)
                rows.append({
                    "bundle": bundle, "method": method, "iteration_s": iteration_s, "step_s": step_s,
                    "ratio": _ratio(iteration_s, reference[0]), "step_ratio": _ratio(step_s, reference[1]),
                    "iteration_min_s": fastest, "min_ratio": _ratio(fastest, reference[2]),
                    "iteration_times_s": measured["iteration_s"], "step_times_s": measured["step_s"],
                    "warmup_times_s": measured["warmup_s"], "labelled_batch": measured["labelled_batch"],
                    "unlabelled_batch": measured["unlabelled_batch"],
                })
    path = write_result("iteration", rows, settings, out_dir, tag, env)
    print_table("training iteration (ratio: method / supervised; target <= 2.5)", rows,
                ["bundle", "method", "iteration_s", "ratio", "step_s", "step_ratio", "iteration_min_s", "min_ratio",
                 "labelled_batch", "unlabelled_batch"])
    print(f"-> {path}")
    return path


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
    _set_threads(threads)
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
                phases = {p: _median(t[warmup:]) for p, t in profiler.times.items()}
                steps = [sum(t[i] for t in profiler.times.values()) for i in range(warmup, warmup + iterations)]
                network_s = _median(network_forward_backward(trainer.network, last["image"], iterations))
                step_s = _median(steps)
                rows.append({
                    "bundle": bundle, "method": method, "batch_shape": list(last["image"].shape),
                    **{f"{p}_s": v for p, v in phases.items()}, "step_s": step_s, "network_s": network_s,
                    "data_share": _ratio(phases["data"], step_s), "step_ratio": _ratio(step_s, network_s),
                    "phase_times_s": {p: t[warmup:] for p, t in profiler.times.items()},
                })
    path = write_result("profile", rows, settings, out_dir, tag, env)
    print_table("training-iteration profile (targets: data_share <= 0.2; supervised step_ratio <= 2)", rows,
                ["bundle", "method", *[f"{p}_s" for p in IterationProfiler.PHASES], "step_s", "network_s",
                 "data_share", "step_ratio"])
    print(f"-> {path}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------------------------


def _take(output: Any, n: int) -> Any:
    """The first ``n`` batch rows of a network output (tensor, or tuple / list / dict of them)."""
    if isinstance(output, torch.Tensor):
        return output[:n]
    if isinstance(output, dict):
        return {k: _take(v, n) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return type(output)(_take(v, n) for v in output)
    return output


class WindowTimer:
    """Wraps a network for an inferer: times its calls, and after ``real_batches`` calls serves the last output.

    The served output (the first rows of the last real output, same shapes) lets the inferer allocate, aggregate
    and normalise the whole volume for real without the network's compute; ``forward_all`` is wrapped too when
    the network has it (``SliceQuantInferer``).

    Args:
        network: the network (eval mode).
        real_batches: calls that run the network; None: all of them.
    """

    def __init__(self, network: torch.nn.Module, real_batches: int | None = None) -> None:
        self.network = network
        self.real_batches = real_batches
        self.forward_s: list[float] = []
        self.served_s: list[float] = []
        self._last: tuple[int, Any] | None = None
        if hasattr(network, "forward_all"):
            self.forward_all = lambda x: self._call(network.forward_all, x)

    def __call__(self, x: torch.Tensor) -> Any:
        return self._call(self.network, x)

    def _call(self, fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
        t0 = time.perf_counter()
        real = self.real_batches is None or len(self.forward_s) < self.real_batches
        if not real and (self._last is None or self._last[0] < x.shape[0]):
            real = True  # a larger batch than the last real one: run it
        if real:
            output = fn(x)
            self._last = (x.shape[0], output)
            self.forward_s.append(time.perf_counter() - t0)
            return output
        output = _take(self._last[1], x.shape[0])  # type: ignore[index]
        self.served_s.append(time.perf_counter() - t0)
        return output


def _padded(n: int, divisor: int = 16) -> int:
    return -(-n // divisor) * divisor


def inference_worker(
    bundle: str,
    network: str,
    widths: str,
    shape: Sequence[int],
    roi_size: Sequence[int] | None,
    sw_batch_size: int,
    overlap: float,
    real_batches: int | None,
    repeats: int,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Full-volume inference of one network in a fresh process: times and the process's peak RSS.

    Args:
        bundle: "ceds_mediastinum" or "cdugjl_liver".
        network: "bundle" (the bundle's network as its inference runs it) or "baseline" (VNet / UNet).
        widths: "cpu_demo" or "paper" (``configs/cpu_demo.json`` or ``configs/inference.json`` channels).
        shape: the volume, channels first ``[C, H, W, D]``.
        roi_size: sliding-window size (CT; None for the slice inferers).
        sw_batch_size: windows (slices) per forward pass.
        overlap: sliding-window overlap (CT).
        real_batches: batches run for real (see :class:`WindowTimer`); None: all.
        repeats: timed runs in this process (>= 1; no untimed warm-up run: a one-shot inference pays its one-off
            costs too).
        threads: ``torch.set_num_threads``.
        seed: seed of the random volume and weights.

    Returns:
        ``times_s``, ``extrapolated``, ``total_batches``, ``real_batches``, ``peak_rss_gb``, ``network``,
        ``inferer``, ``channels``.
    """
    from monai.inferers import SlidingWindowInferer, SliceInferer
    from monai.networks.nets import UNet, VNet

    _set_threads(threads)
    torch.manual_seed(seed)
    configs = ["inference.json", "cpu_demo.json"] if widths == "cpu_demo" else ["inference.json"]
    parser = bundle_config(bundle, configs)
    channels = [int(c) for c in parser.get_parsed_content("channels")]
    if bundle == "ceds_mediastinum":
        inferer = SlidingWindowInferer(roi_size=list(roi_size), sw_batch_size=sw_batch_size, overlap=overlap)
        if network == "bundle":
            wrapper = bundle_module(bundle, "inference").SegmentationWithConfidence
            net, name = wrapper(parser.get_parsed_content("network_def")), "CEDSNet+confidence"
        else:
            net, name, channels = VNet(spatial_dims=3, in_channels=shape[0], out_channels=2), "VNet", VNET_CHANNELS
    elif network == "bundle":
        net, name = parser.get_parsed_content("network_def"), "MEAMTNet"
        inferer = bundle_module(bundle, "inferers").SliceQuantInferer(spatial_dim=2, sw_batch_size=sw_batch_size)
    else:
        strides = [2] * (len(channels) - 1)
        net, name = UNet(2, shape[0], 2, channels=channels, strides=strides, num_res_units=2), "UNet"
        window = [_padded(shape[1]), _padded(shape[2])]
        inferer = SliceInferer(roi_size=window, sw_batch_size=sw_batch_size, spatial_dim=2, overlap=0.0)
    net.eval()
    hwm_before = peak_rss()
    reset_peak_rss()
    volume = torch.rand(1, *shape) if bundle == "ceds_mediastinum" else torch.randn(1, *shape)
    times, extrapolated, timer = [], False, None
    with torch.inference_mode():
        for _ in range(repeats):
            timer = WindowTimer(net, real_batches)
            t0 = time.perf_counter()
            inferer(volume, timer)
            wall = time.perf_counter() - t0
            served = len(timer.served_s)
            if served:  # the first forward pays one-off costs (a real run pays them once, as measured)
                forward_s = statistics.mean(timer.forward_s[1:] or timer.forward_s)
                wall += served * forward_s - sum(timer.served_s)
                extrapolated = True
            times.append(wall)
    return {
        "network": name,
        "inferer": type(inferer).__name__,
        "channels": channels,
        "times_s": times,
        "extrapolated": extrapolated,
        "total_batches": len(timer.forward_s) + len(timer.served_s),
        "real_batches": len(timer.forward_s),
        "peak_rss_gb": max(hwm_before, peak_rss()) / 2**30,
    }


def inference(
    ct_shape: Sequence[int] = (512, 512, 300),
    mri_shape: Sequence[int] = (2, 256, 256, 40),
    widths: Sequence[str] = ("cpu_demo", "paper"),
    bundles: Sequence[str] = ("ceds_mediastinum", "cdugjl_liver"),
    roi_size: Sequence[int] | None = None,
    ct_sw_batch_size: int | None = None,
    overlap: float | None = None,
    mri_sw_batch_size: int | None = None,
    ct_window_batches: int | None = 2,
    mri_window_batches: int | None = None,
    repeats: int = 1,
    threads: int | None = None,
    out_dir: str = DEFAULT_OUT_DIR,
    tag: str = "",
) -> str:
    """Full-volume inference time and peak RSS of each bundle's network against a MONAI baseline.

    Args:
        ct_shape: CT volume (one channel), ``[H, W, D]``.
        mri_shape: MRI volume, channels first ``[C, H, W, D]`` (C = the bundle's ``in_channels``, 2).
        widths: network widths to benchmark: "cpu_demo" and/or "paper".
        bundles: the bundles to benchmark.
        roi_size: CT sliding-window size (default: ``roi_size`` of the CEDS ``inference.json``).
        ct_sw_batch_size: CT windows per forward pass (default: ``sw_batch_size`` of ``inference.json``).
        overlap: CT window overlap (default: ``sw_overlap`` of ``inference.json``).
        mri_sw_batch_size: slices per forward pass (default: ``sw_batch_size`` of the liver ``inference.json``).
        ct_window_batches: CT window batches run for real, the rest extrapolated (see the module docstring);
            None: all.
        mri_window_batches: the same for the MRI slice batches (default: all for real).
        repeats: timed runs per network (each in the same fresh process).
        threads: ``torch.set_num_threads``.
        out_dir: folder of the JSON result.
        tag: suffix of the file name.

    Returns:
        the path of the JSON result.
    """
    _set_threads(threads)
    settings = {k: v for k, v in locals().items() if k not in ("out_dir", "tag")}
    settings.update(ct_shape=list(ct_shape), mri_shape=list(mri_shape), widths=list(widths), bundles=list(bundles),
                    targets={"time_ratio": 1.5, "peak_rss_gb": 6.0})
    env = environment()
    ceds = bundle_config("ceds_mediastinum", ["inference.json"])
    liver = bundle_config("cdugjl_liver", ["inference.json"])
    ct = {
        "shape": [1, *map(int, ct_shape)],
        "roi_size": list(roi_size or ceds.get_parsed_content("roi_size")),
        "sw_batch_size": int(ct_sw_batch_size or ceds.get_parsed_content("sw_batch_size")),
        "overlap": float(overlap if overlap is not None else ceds.get_parsed_content("sw_overlap")),
        "real_batches": ct_window_batches,
    }
    mri = {
        "shape": [int(n) for n in mri_shape],
        "roi_size": None,
        "sw_batch_size": int(mri_sw_batch_size or liver.get_parsed_content("sw_batch_size")),
        "overlap": 0.0,
        "real_batches": mri_window_batches,
    }
    rows = []
    for bundle in bundles:
        volume, setup = ("ct", ct) if bundle == "ceds_mediastinum" else ("mri", mri)
        baseline = None
        for width in widths:
            common = dict(shape=setup["shape"], roi_size=setup["roi_size"], sw_batch_size=setup["sw_batch_size"],
                          overlap=setup["overlap"], real_batches=setup["real_batches"], repeats=repeats,
                          threads=threads)
            measured = run_isolated(inference_worker, bundle, "bundle", width, **common)
            if baseline is None or bundle == "cdugjl_liver":  # VNet has fixed widths: run it once
                baseline = run_isolated(inference_worker, bundle, "baseline", width, **common)
            time_s, base_s = _median(measured["times_s"]), _median(baseline["times_s"])
            rows.append({
                "bundle": bundle, "volume": volume, "shape": setup["shape"], "widths": width,
                "channels": measured["channels"], "network": measured["network"], "baseline": baseline["network"],
                "baseline_channels": baseline["channels"], "inferer": measured["inferer"],
                "baseline_inferer": baseline["inferer"], "roi_size": setup["roi_size"],
                "sw_batch_size": setup["sw_batch_size"], "overlap": setup["overlap"], "time_s": time_s,
                "baseline_time_s": base_s, "time_ratio": _ratio(time_s, base_s),
                "peak_rss_gb": measured["peak_rss_gb"], "baseline_peak_rss_gb": baseline["peak_rss_gb"],
                "times_s": measured["times_s"], "baseline_times_s": baseline["times_s"],
                "extrapolated": measured["extrapolated"], "baseline_extrapolated": baseline["extrapolated"],
                "total_batches": measured["total_batches"], "real_batches": measured["real_batches"],
                "baseline_real_batches": baseline["real_batches"],
            })
    path = write_result("inference", rows, settings, out_dir, tag, env)
    print_table("full-volume inference (targets: time_ratio <= 1.5, peak_rss_gb <= 6 on 512x512x300)", rows,
                ["volume", "widths", "network", "baseline", "time_s", "baseline_time_s", "time_ratio", "peak_rss_gb",
                 "baseline_peak_rss_gb", "extrapolated"])
    print(f"-> {path}")
    return path


def run_all(out_dir: str = DEFAULT_OUT_DIR, tag: str = "", threads: int | None = None) -> list[str]:
    """Run ``scan``, ``iteration`` and ``inference`` with their defaults; returns the three JSON paths."""
    return [
        scan(threads=threads, out_dir=out_dir, tag=tag),
        iteration(threads=threads, out_dir=out_dir, tag=tag),
        inference(threads=threads, out_dir=out_dir, tag=tag),
    ]


if __name__ == "__main__":
    fire.Fire({"scan": scan, "iteration": iteration, "profile": profile, "inference": inference, "all": run_all})
