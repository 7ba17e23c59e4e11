"""The ``inference`` benchmark of ``scripts/benchmark_speed.py``: full-volume inference of each bundle's network
against a MONAI baseline under the same sliding-window settings."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from bundle_imports import bundle_module
from speed_common import (DEFAULT_OUT_DIR, bundle_config, environment, median_of, peak_rss, ratio_of,
                          reset_peak_rss, run_isolated, set_threads, write_and_print)

VNET_CHANNELS = [16, 32, 64, 128, 256]
"""The fixed widths of ``monai.networks.nets.VNet`` (recorded in the inference rows)."""


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

    set_threads(threads)
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
    set_threads(threads)
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
            time_s, base_s = median_of(measured["times_s"]), median_of(baseline["times_s"])
            rows.append({
                "bundle": bundle, "volume": volume, "shape": setup["shape"], "widths": width,
                "channels": measured["channels"], "network": measured["network"], "baseline": baseline["network"],
                "baseline_channels": baseline["channels"], "inferer": measured["inferer"],
                "baseline_inferer": baseline["inferer"], "roi_size": setup["roi_size"],
                "sw_batch_size": setup["sw_batch_size"], "overlap": setup["overlap"], "time_s": time_s,
                "baseline_time_s": base_s, "time_ratio": ratio_of(time_s, base_s),
                "peak_rss_gb": measured["peak_rss_gb"], "baseline_peak_rss_gb": baseline["peak_rss_gb"],
                "times_s": measured["times_s"], "baseline_times_s": baseline["times_s"],
                "extrapolated": measured["extrapolated"], "baseline_extrapolated": baseline["extrapolated"],
                "total_batches": measured["total_batches"], "real_batches": measured["real_batches"],
                "baseline_real_batches": baseline["real_batches"],
            })
    return write_and_print("inference", rows, settings, out_dir, tag, env,
                           "full-volume inference (targets: time_ratio <= 1.5, peak_rss_gb <= 6 on 512x512x300)",
                           ["volume", "widths", "network", "baseline", "time_s", "baseline_time_s", "time_ratio",
                            "peak_rss_gb", "baseline_peak_rss_gb", "extrapolated"])
