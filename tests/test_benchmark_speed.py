"""scripts/benchmark_speed.py on tiny sizes: scan agreement, memory helpers, window timing, the JSON results of the
``scan``, ``inference`` and ``iteration`` subcommands (the last two run real networks and bundle trainers)."""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import pytest
import torch
from monai.inferers import SlidingWindowInferer

import benchmark_speed as bench
import speed_inference

ENVIRONMENT_KEYS = {
    "date_utc", "python", "torch", "monai", "platform", "cpu", "cpu_count", "torch_threads", "load_average", "cuda",
    "gpu",
}


def _load(path: str, benchmark: str) -> dict:
    result = json.loads(Path(path).read_text())
    assert set(result) >= {"benchmark", "command", "environment", "settings", "rows"}
    assert result["benchmark"] == benchmark
    assert isinstance(result["command"], str) and result["command"]
    assert ENVIRONMENT_KEYS <= set(result["environment"])
    assert result["environment"]["torch"] == torch.__version__
    assert result["rows"] and all(isinstance(r, dict) for r in result["rows"])
    return result


def _positive_finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("length,chunk_size", [(128, 32), (100, 64)])
def test_chunked_and_reference_scans_agree(length, chunk_size):
    inputs = bench.scan_inputs(length, batch=2, d_inner=8, d_state=4)
    y_ref, grads_ref = bench.scan_forward_backward("ref", inputs)
    y, grads = bench.scan_forward_backward("chunked", inputs, chunk_size)
    assert y.shape == (2, 8, length)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    assert set(grads) == set(inputs)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-4, rtol=1e-4)
    assert bench.scan_agreement("chunked", "ref", inputs, chunk_size) < 1e-4


def test_peak_rss_reset_and_growth():
    size = 64 * 2**20
    before = bench.reset_peak_rss()
    # a fresh anonymous mapping, every page touched: heap memory that earlier tests freed but the allocator kept
    # resident would not raise the RSS (a 64 MiB tensor did not, after the bundle inference tests)
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    peak = bench.peak_rss()
    assert peak > 0
    if before:  # Linux: the reset makes the peak track this allocation
        assert peak - before >= 48 * 2**20
    block.close()


def test_window_timer_serves_and_extrapolates():
    net = torch.nn.Conv3d(1, 2, 1).eval()  # pointwise: sliding-window and whole-volume outputs are equal
    inferer = SlidingWindowInferer(roi_size=[16, 16, 16], sw_batch_size=2, overlap=0.0)
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.inference_mode():
        full = bench.WindowTimer(net)
        expected = inferer(x, full)
        assert len(full.forward_s) == 2 and not full.served_s  # 4 windows, 2 per batch
        torch.testing.assert_close(expected, net(x), atol=1e-5, rtol=1e-5)
        partial = bench.WindowTimer(net, real_batches=1)
        out = inferer(x, partial)
    assert len(partial.forward_s) == 1 and len(partial.served_s) == 1
    assert out.shape == expected.shape
    assert speed_inference._take({"a": torch.zeros(4, 2), "b": [torch.zeros(4)]}, 3)["b"][0].shape == (3,)


def test_scan_writes_json_with_schema(tmp_path):
    path = bench.scan(lengths=[64], repeats=1, warmup=0, gpu_length=64, out_dir=str(tmp_path), tag="test")
    assert Path(path).name == "scan_test.json"
    result = _load(path, "scan")
    assert result["settings"]["lengths"] == [64]
    cpu = {r["method"]: r for r in result["rows"] if r["device"] == "cpu"}
    assert sorted(cpu) == ["chunked", "fused"]
    if cpu["fused"]["status"] != "ok":
        assert cpu["fused"]["status"] == "skipped: numba not installed"
        del cpu["fused"]
    for row in cpu.values():
        assert (row["baseline"], row["status"], row["length"]) == ("ref", "ok", 64)
        assert _positive_finite(row["time_s"]) and _positive_finite(row["baseline_time_s"])
        assert _positive_finite(row["speedup"])
        assert len(row["times_s"]) == len(row["baseline_times_s"]) == 1
        assert row["peak_mb"] >= 0 and row["baseline_peak_mb"] >= 0
        assert row["max_abs_error"] < 1e-4
    gpu = [r for r in result["rows"] if r["device"] == "cuda"]
    assert len(gpu) == 1
    if not torch.cuda.is_available():
        assert gpu[0]["status"] == "skipped: no CUDA"


@pytest.mark.integration
def test_inference_writes_json_with_ratios(tmp_path):
    path = bench.inference(
        ct_shape=[64, 64, 24],
        mri_shape=[2, 40, 40, 5],
        widths=["cpu_demo"],
        roi_size=[32, 32, 16],
        ct_sw_batch_size=2,
        ct_window_batches=1,
        mri_sw_batch_size=2,
        out_dir=str(tmp_path),
    )
    result = _load(path, "inference")
    rows = {r["volume"]: r for r in result["rows"]}
    assert set(rows) == {"ct", "mri"}
    ct, mri = rows["ct"], rows["mri"]
    assert (ct["network"], ct["baseline"], ct["inferer"]) == ("CEDSNet+confidence", "VNet", "SlidingWindowInferer")
    assert (mri["network"], mri["baseline"]) == ("MEAMTNet", "UNet")
    assert (mri["inferer"], mri["baseline_inferer"]) == ("SliceQuantInferer", "SliceInferer")
    assert ct["channels"] == [4, 8, 16, 32, 64] and mri["channels"] == mri["baseline_channels"]
    assert ct["shape"] == [1, 64, 64, 24] and ct["roi_size"] == [32, 32, 16]
    # 3 x 3 x 2 windows in batches of 2: one real batch, the others served and extrapolated
    assert ct["total_batches"] == 9 and ct["real_batches"] == 1 and ct["extrapolated"]
    assert mri["total_batches"] == 3 and not mri["extrapolated"]  # 5 slices, 2 per batch
    for row in rows.values():
        for key in ("time_s", "baseline_time_s", "time_ratio", "peak_rss_gb", "baseline_peak_rss_gb"):
            assert _positive_finite(row[key]), (row["volume"], key, row[key])
        assert row["peak_rss_gb"] < 6


@pytest.mark.integration
def test_iteration_ceds_methods(ct_data, tmp_path):
    path = bench.iteration(
        bundles=["ceds_mediastinum"],
        iterations=1,
        warmup=1,
        datalists={"ceds_mediastinum": str(ct_data / "datalist_20.json")},
        overrides={"num_samples": 1},
        out_dir=str(tmp_path),
    )
    rows = {r["method"]: r for r in _load(path, "iteration")["rows"]}
    assert list(rows) == ["supervised", "mean_teacher", "ceds"]
    assert rows["supervised"]["ratio"] == pytest.approx(1.0) and rows["supervised"]["min_ratio"] == pytest.approx(1.0)
    for method, row in rows.items():
        assert row["bundle"] == "ceds_mediastinum"
        for key in ("iteration_s", "ratio", "step_ratio", "iteration_min_s", "min_ratio"):
            assert _positive_finite(row[key]), (method, key, row[key])
        assert len(row["iteration_times_s"]) == 1 and len(row["warmup_times_s"]) == 1
        assert row["labelled_batch"] == 1
        assert (row["unlabelled_batch"] > 0) == (method != "supervised")


@pytest.mark.integration
def test_iteration_liver_full_cdugjl(liver_data, tmp_path):
    path = bench.iteration(
        bundles=["cdugjl_liver"],
        methods=["cdugjl"],
        iterations=1,
        warmup=1,
        datalists={"cdugjl_liver": str(liver_data / "datalist_20.json")},
        overrides={"roi_size": [32, 32], "num_samples": 1},
        out_dir=str(tmp_path),
    )
    rows = {r["method"]: r for r in _load(path, "iteration")["rows"]}
    assert list(rows) == ["supervised", "cdugjl"]
    assert rows["supervised"]["unlabelled_batch"] == 0 and rows["cdugjl"]["unlabelled_batch"] > 0
    assert _positive_finite(rows["cdugjl"]["ratio"])


@pytest.mark.integration
def test_profile_splits_an_iteration_into_phases(ct_data, liver_data, tmp_path):
    path = bench.profile(
        iterations=2,
        warmup=1,
        datalists={"ceds_mediastinum": str(ct_data / "datalist_20.json"),
                   "cdugjl_liver": str(liver_data / "datalist_20.json")},
        overrides={"ceds_mediastinum": {"num_samples": 1}, "cdugjl_liver": {"roi_size": [32, 32], "num_samples": 1}},
        out_dir=str(tmp_path),
    )
    rows = {r["bundle"]: r for r in _load(path, "profile")["rows"]}
    assert set(rows) == {"ceds_mediastinum", "cdugjl_liver"}
    for bundle, row in rows.items():
        assert row["method"] == "supervised" and row["batch_shape"][0] >= 1
        for phase in bench.IterationProfiler.PHASES:
            times = row["phase_times_s"][phase]
            assert len(times) == 2 and all(t >= 0 for t in times), (bundle, phase, times)
        # the phases tile the iteration: their per-iteration sums are the steps whose median is step_s
        sums = sorted(sum(row["phase_times_s"][p][i] for p in bench.IterationProfiler.PHASES) for i in range(2))
        assert row["step_s"] == pytest.approx(sum(sums) / 2)
        for key in ("forward_s", "backward_s", "step_s", "network_s", "step_ratio"):
            assert _positive_finite(row[key]), (bundle, key, row[key])
        assert 0 <= row["data_share"] < 1
        assert row["forward_s"] + row["backward_s"] <= row["step_s"]
