"""The ``scan`` benchmark of ``scripts/benchmark_speed.py``: the liver bundle's fused (numba) and chunked selective
scans against its sequential reference (and ``mamba_ssm`` on a GPU), forward + backward."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from bundle_imports import bundle_module
from speed_common import (DEFAULT_OUT_DIR, environment, median_of, peak_rss, ratio_of, reset_peak_rss,
                          run_isolated, set_threads, write_and_print)

SCAN_TOLERANCE = 1e-4


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
    """The selective scan ``impl`` ("ref", "chunked", "fused" or "mamba_ssm"); ``mamba_ssm`` is imported only here."""
    if impl == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn
    if impl == "fused":
        return bundle_module("cdugjl_liver", "selective_scan_fused").selective_scan_fused
    scan = bundle_module("cdugjl_liver", "selective_scan")
    return {"ref": scan.selective_scan_ref, "chunked": scan.selective_scan_chunked}[impl]


def scan_forward_backward(
    impl: str, inputs: dict[str, torch.Tensor], chunk_size: int = 64
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward (``y.sum().backward()``) of the scan ``impl`` on fresh leaf copies of ``inputs``.

    Args:
        impl: "ref", "chunked", "fused" or "mamba_ssm".
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
    set_threads(threads)
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
    return {**row, "status": "ok", "time_s": median_of(times), "baseline_time_s": median_of(base_times),
            "speedup": ratio_of(median_of(base_times), median_of(times)), "times_s": times,
            "baseline_times_s": base_times, "peak_mb": peak, "baseline_peak_mb": base_peak}


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
    """Fused and chunked vs. sequential selective scan on the CPU (and ``mamba_ssm`` vs. chunked on a GPU, if any).

    One row per CPU scan and length, each against the reference measured in the same call (every timing in a
    fresh process); the fused rows say ``skipped`` without numba.

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
    set_threads(threads)
    settings = {k: v for k, v in locals().items() if k not in ("out_dir", "tag")}
    settings["lengths"] = [int(n) for n in lengths]
    env = environment()
    rows = []
    impls = ("fused", "chunked") if bundle_module("cdugjl_liver", "selective_scan_fused").AVAILABLE else ("chunked",)
    for length in settings["lengths"]:
        shape = dict(length=length, batch=batch, d_inner=d_inner, d_state=d_state, chunk_size=chunk_size)
        errors = {impl: scan_agreement(impl, "ref", scan_inputs(length, batch, d_inner, d_state), chunk_size)
                  for impl in impls}
        measured = {
            impl: run_isolated(scan_worker, impl, repeats=repeats, warmup=warmup, threads=threads, **shape)
            for impl in (*impls, "ref")
        }
        ref = measured["ref"]
        base_s = median_of(ref["times_s"])
        if "fused" not in impls:
            rows.append({"device": "cpu", "method": "fused", "baseline": "ref", **shape,
                         "status": "skipped: numba not installed"})
        for impl in impls:
            time_s = median_of(measured[impl]["times_s"])
            rows.append({"device": "cpu", "method": impl, "baseline": "ref", "status": "ok", **shape,
                         "time_s": time_s, "baseline_time_s": base_s, "speedup": ratio_of(base_s, time_s),
                         "times_s": measured[impl]["times_s"], "baseline_times_s": ref["times_s"],
                         "peak_mb": measured[impl]["peak_mb"], "baseline_peak_mb": ref["peak_mb"],
                         "max_abs_error": errors[impl]})
    rows.append(_scan_gpu_row(gpu_length, batch, d_inner, d_state, chunk_size, repeats, warmup))
    return write_and_print("scan", rows, settings, out_dir, tag, env,
                           "selective scan, forward + backward "
                           "(time_s: fused / chunked / mamba_ssm, baseline: ref / ref / chunked)",
                           ["device", "length", "method", "baseline", "time_s", "baseline_time_s", "speedup",
                            "peak_mb", "baseline_peak_mb", "status"])
