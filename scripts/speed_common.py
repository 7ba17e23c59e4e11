"""Shared helpers of ``scripts/benchmark_speed.py``: bundle configs, peak memory of a fresh process, the
environment record, result files and tables (see that module's docstring for the benchmarks and the JSON schema)."""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from bundle_imports import use_bundle

DEFAULT_OUT_DIR = "docs/benchmarks/results/speed"


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


def write_and_print(
    benchmark: str, rows: list[dict], settings: dict[str, Any], out_dir: str, tag: str, env: dict[str, Any],
    title: str, columns: Sequence[str],
) -> str:
    """:func:`write_result`, then :func:`print_table` of ``columns`` and the written path; returns the path."""
    path = write_result(benchmark, rows, settings, out_dir, tag, env)
    print_table(title, rows, columns)
    print(f"-> {path}")
    return path


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


def median_of(values: Sequence[float]) -> float | None:
    """The median, ``None`` for no values."""
    return statistics.median(values) if values else None


def ratio_of(a: float | None, b: float | None) -> float | None:
    """``a / b``, ``None`` when either is missing or ``b`` is 0."""
    return a / b if a is not None and b else None


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` unless ``threads`` is ``None`` or 0."""
    if threads:
        torch.set_num_threads(int(threads))
