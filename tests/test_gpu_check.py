"""The GPU check (scripts/gpu_check.py) on a machine without CUDA: the sm_90 patch and its check (on a toy sdist and
on the real mamba-ssm sdist), the run stopping before the build with exit 3, the summary it writes, the order and
dependencies of the stages (with stand-ins for the CUDA ones), and the semi-supervised comparison's plumbing on the
tiny profile."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import gpu_check
import pytest
import torch

from conftest import REPO

HOPPER = "arch=compute_90,code=sm_90"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the run on a machine without CUDA")
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Network is unreachable", "timed out", "ConnectTimeout", "Could not fetch URL", "ProxyError")

# a CUDA extension laid out as mamba-ssm's: architectures chosen in setup.py (an -arch form among them)
TOY_SETUP = """
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

cc_flag = []
for arch in ("75", "80", "90", "100"):
    cc_flag += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
ext_modules = [CUDAExtension(name="toy_cuda", sources=["csrc/toy.cpp", "csrc/toy_kernel.cu"],
                             extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-arch=sm_80", *cc_flag]})]

setup(name="toy", version="0.1", ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
"""


def toy_sdist(folder: Path) -> Path:
    files = {"toy-0.1/setup.py": TOY_SETUP, "toy-0.1/csrc/toy.cpp": "// toy\n",
             "toy-0.1/csrc/toy_kernel.cu": "// toy\n"}
    path = folder / "toy-0.1.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


def wheel_folder(folder: Path, sdist: Path) -> Path:
    """A carried folder as prepare leaves it, with only an sdist (enough for the stages before the build)."""
    folder.mkdir()
    shutil.copy(sdist, folder)
    files = [{"name": "toy", "version": "0.1", "kind": "sdist", "pinned": True, "why": "test",
              "file": sdist.name, "bytes": sdist.stat().st_size, "sha256": gpu_check.sha256(sdist)}]
    (folder / "manifest.json").write_text(json.dumps({"files": files, "total_bytes": files[0]["bytes"]}))
    return folder


def test_arch_flags_reads_every_form():
    flags = ["-O3", "-gencode", "arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90", "-arch=sm_75",
             "--gpu-architecture", "sm_70", "-code", "sm_70", "--ptxas-options=-v", "-march=native"]
    assert gpu_check.arch_flags(flags) == ["arch=compute_80,code=sm_80", HOPPER, "-arch=sm_75", "-arch=sm_70",
                                           "-code=sm_70"]
    ninja = ("cuda_cflags = -I/x -O3\ncuda_post_cflags = -O3 -gencode arch=compute_90,code=sm_90 "
             "-gencode arch=compute_90,code=sm_90\nbuild a.o: cuda_compile a.cu\n")
    assert gpu_check.ninja_arch_flags(ninja) == [HOPPER]


def test_patch_leaves_only_sm90_on_a_toy_extension(tmp_path):
    source, flags = gpu_check.unpack_and_patch(toy_sdist(tmp_path), tmp_path / "work", "13.0")
    assert flags["before"] == sorted(["-arch=sm_80", "arch=compute_75,code=sm_75", "arch=compute_80,code=sm_80",
                                      HOPPER, "arch=compute_100,code=sm_100"])
    assert flags["after"] == [HOPPER] and flags["nvcc_commands_seen"] >= 1
    # the nvcc command lines the stand-in build saw, torch's own flags included
    for argv in json.loads((tmp_path / "work" / "standin" / "nvcc_patched.json").read_text()):
        assert gpu_check.arch_flags(argv) == [HOPPER] and "toy_kernel.cu" in " ".join(argv)
    text = (source / "setup.py").read_text()
    gpu_check.patch_setup(source)  # patching twice changes nothing
    assert (source / "setup.py").read_text() == text and text.count(gpu_check.PATCH_BEGIN) == 1
    assert not (source / "build").exists()


def test_patch_refuses_an_unexpected_setup_py(tmp_path):
    (tmp_path / "setup.py").write_text("from setuptools import setup\nsetup(name='x')\n")
    with pytest.raises(RuntimeError, match="no ext_modules"):
        gpu_check.patch_setup(tmp_path)


def real_sdist(tmp_path: Path) -> Path:
    """The mamba-ssm sdist of a prepared outputs/gpu_wheels (when it is the pinned one), else downloaded."""
    probe = subprocess.run([sys.executable, "-c", "import setuptools, wheel.bdist_wheel"], capture_output=True)
    if probe.returncode != 0:  # setuptools >= 70.1 carries it; older ones need the wheel package
        pytest.skip("mamba-ssm's setup.py imports wheel.bdist_wheel, which this environment lacks")
    manifest = gpu_check.WHEEL_DIR / "manifest.json"
    if manifest.is_file():
        files = json.loads(manifest.read_text())["files"]
        sdist = gpu_check.WHEEL_DIR / next(f["file"] for f in files if f["kind"] == "sdist")
        if sdist.is_file() and gpu_check.MAMBA_SSM in sdist.name:
            return sdist
    try:
        return gpu_check.download_sdist(tmp_path / "download")
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        if any(marker in str(e) for marker in NETWORK_ERRORS) or isinstance(e, subprocess.TimeoutExpired):
            pytest.skip(f"the package registry is unreachable: {str(e)[-300:]}")
        raise


@pytest.mark.integration
@pytest.mark.parametrize("cuda", ["12.8", "13.0"])
def test_patch_of_the_real_sdist_leaves_only_sm90(tmp_path, cuda):
    """mamba-ssm's own setup.py picks many architectures for this nvcc; after the patch its build runs nvcc with
    sm_90 alone (every command line the stand-in nvcc saw, and torch's build.ninja)."""
    _, flags = gpu_check.unpack_and_patch(real_sdist(tmp_path), tmp_path / "work", cuda)
    assert {"arch=compute_80,code=sm_80", HOPPER, "arch=compute_120,code=sm_120"} <= set(flags["before"])
    assert flags["after"] == [HOPPER]
    assert flags["nvcc_commands_seen"] >= 1 and flags["build_ninja_checked"] == bool(shutil.which("ninja"))


def run_check(tmp_path: Path, wheels: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "run", "--out", str(out), "--work",
                           str(tmp_path / "work"), "--wheels", str(wheels), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    return proc, json.loads((out / "summary.json").read_text())


CUDA_STAGES = ("ssl", "build", "arch_check", "mamba_import", "pytest_gpu", "scan")


@NO_CUDA
def test_run_without_cuda_stops_before_the_build(tmp_path):
    proc, summary = run_check(tmp_path, wheel_folder(tmp_path / "wheels", toy_sdist(tmp_path)))
    assert proc.returncode == gpu_check.EXIT_NO_CUDA == 3, proc.stdout + proc.stderr
    assert "no CUDA: stopped before the stages that need it" in proc.stdout
    # the summary's shape
    assert {"check", "result", "exit_code", "failed", "cuda", "budget_s", "seconds", "started_utc", "environment",
            "stages"} <= set(summary)
    assert (summary["result"], summary["exit_code"], summary["failed"], summary["cuda"]) == ("no_cuda", 3, [], False)
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["environment", "wheels", "patch", *CUDA_STAGES]
    for s in stages.values():
        assert set(s) == {"name", "needs_cuda", "status", "seconds", "start_s", "detail", "error"}
    for name in ("environment", "wheels", "patch"):
        assert stages[name]["status"] == "ok" and stages[name]["seconds"] >= 0 and not stages[name]["needs_cuda"]
    for name in CUDA_STAGES:
        assert stages[name]["status"] == "not run: no CUDA" and stages[name]["needs_cuda"]
    assert stages["environment"]["detail"]["cuda_available"] is False
    assert stages["wheels"]["detail"]["install"].startswith("not run: no CUDA")
    assert stages["patch"]["detail"]["arch_flags"]["after"] == [HOPPER]
    # what the device tool returns: at most 8 files, at most 2 folders down
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"summary.json", "gpu_check.log", "details.tar.gz"}
    with tarfile.open(tmp_path / "out" / "details.tar.gz") as tar:
        assert {"details/summary.json", "details/environment.log"} <= set(tar.getnames())


@NO_CUDA
def test_run_without_a_prepared_folder_fails(tmp_path):
    proc, summary = run_check(tmp_path, tmp_path / "missing")
    assert proc.returncode == gpu_check.EXIT_FAILED, proc.stdout + proc.stderr
    stages = {s["name"]: s for s in summary["stages"]}
    assert summary["failed"] == ["wheels", "patch"]
    assert "run `bash scripts/gpu_check.sh prepare`" in stages["wheels"]["error"]
    assert all(stages[name]["status"] == "not run: no CUDA" for name in CUDA_STAGES)


def fake_stages(monkeypatch, failing: tuple[str, ...] = ()) -> list[str]:
    """Stand-ins for every stage of a CUDA machine (the comparison included); returns the stages run, in order."""
    ran = []

    def stage(name):
        def fn(self, st):
            ran.append(name)
            if name == "environment":
                self.cuda = True
            if name in failing:
                raise gpu_check.StageFailed(f"{name} failed on purpose")
        return fn

    for name in ("environment", "wheels", "patch", "build", "arch_check", "mamba_import", "pytest_gpu", "scan"):
        monkeypatch.setattr(gpu_check.GpuCheck, f"st_{name}", stage(name))

    def comparison(self, deadline):
        ran.append("ssl")
        return {"status": "failed" if "ssl" in failing else "ok", "runs": {}}

    monkeypatch.setattr(gpu_check.SslComparison, "run", comparison)
    return ran


def check_stages(tmp_path: Path, budget: float = 560, skip: tuple[str, ...] = ()) -> tuple[int, dict]:
    code = gpu_check.GpuCheck(tmp_path / "out", tmp_path / "work", tmp_path / "wheels", budget, list(skip), 1,
                              "13.0").run()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    return code, {s["name"]: s["status"] for s in summary["stages"]}


def test_with_cuda_every_stage_runs_and_the_scan_waits_for_the_comparison(tmp_path, monkeypatch):
    ran = fake_stages(monkeypatch)
    code, status = check_stages(tmp_path)
    assert code == gpu_check.EXIT_OK and set(status.values()) == {"ok"}
    assert ran[:3] == ["environment", "wheels", "patch"] and ran[-1] == "scan" and "ssl" in ran


def test_a_failed_build_skips_what_needs_it_and_nothing_else(tmp_path, monkeypatch):
    fake_stages(monkeypatch, failing=("build",))
    code, status = check_stages(tmp_path)
    assert code == gpu_check.EXIT_FAILED
    assert status == {"environment": "ok", "wheels": "ok", "patch": "ok", "ssl": "ok", "build": "failed",
                      "arch_check": "skipped: needs build", "mamba_import": "skipped: needs build",
                      "pytest_gpu": "skipped: needs mamba_import", "scan": "skipped: needs mamba_import"}


def test_a_failed_architecture_check_blocks_nothing(tmp_path, monkeypatch):
    fake_stages(monkeypatch, failing=("arch_check",))
    code, status = check_stages(tmp_path)
    assert code == gpu_check.EXIT_FAILED and status["arch_check"] == "failed"
    assert all(v == "ok" for k, v in status.items() if k != "arch_check")


def test_stages_without_time_left_fail_the_check_and_skipped_ones_do_not(tmp_path, monkeypatch):
    fake_stages(monkeypatch)
    code, status = check_stages(tmp_path, budget=100)  # too little for the build (230 s) and the comparison (150 s)
    assert code == gpu_check.EXIT_FAILED
    assert status["build"] == status["ssl"] == "skipped: out of time"
    code, status = check_stages(tmp_path, skip=("ssl", "scan"))
    assert code == gpu_check.EXIT_OK and status["ssl"] == status["scan"] == "skipped: --skip"


def test_the_architecture_check_reads_the_build(tmp_path):
    check = gpu_check.GpuCheck(tmp_path / "out", tmp_path / "work", tmp_path / "wheels", 560, [], 1, "13.0")
    check.logs.mkdir(parents=True)
    check.source = tmp_path / "src"
    ninja = check.source / "build" / "temp.linux-x86_64-cpython-312" / "build.ninja"
    ninja.parent.mkdir(parents=True)
    ninja.write_text(f"cuda_post_cflags = -O3 -gencode {HOPPER} --use_fast_math\n")
    (check.logs / "build.log").write_text(f"[3/10] /usr/local/cuda/bin/nvcc -c a.cu -gencode {HOPPER}\n")
    st = gpu_check.Stage("arch_check", True)
    check.st_arch_check(st)
    assert {k: v for k, v in st.detail["arch_seen"].items() if v} == {"build_ninja": [HOPPER], "build_log": [HOPPER]}
    ninja.write_text(f"cuda_post_cflags = -gencode arch=compute_80,code=sm_80 -gencode {HOPPER}\n")
    with pytest.raises(gpu_check.StageFailed, match="other than sm_90"):
        check.st_arch_check(st)
    ninja.unlink()
    (check.logs / "build.log").write_text("nothing\n")
    with pytest.raises(gpu_check.StageFailed, match="showed an architecture"):
        check.st_arch_check(st)


def test_a_changed_carried_file_is_refused(tmp_path):
    wheels = wheel_folder(tmp_path / "wheels", toy_sdist(tmp_path))
    gpu_check.load_manifest(wheels)
    (wheels / "extra-1.0-py3-none-any.whl").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="not in the manifest"):
        gpu_check.load_manifest(wheels)
    (wheels / "extra-1.0-py3-none-any.whl").unlink()
    (wheels / "toy-0.1.tar.gz").write_bytes(b"changed")
    with pytest.raises(RuntimeError, match="missing or changed"):
        gpu_check.load_manifest(wheels)


def test_carried_packages():
    names = [c.name for c in gpu_check.CARRIED]
    assert len(names) == len(set(names))
    assert {"monai", "pytorch-ignite", "fire", "nibabel"} <= {c.name for c in gpu_check.CARRIED if c.pinned}
    assert not {"torch", "triton", "numba", "llvmlite"} & set(names)
    assert tuple(int(v) for v in gpu_check.MAMBA_SSM.split(".")[:2]) >= (2, 2)  # requirements-gpu.txt: >=2.2


def test_the_wheel_folder_is_ignored_by_git():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "check-ignore", "-q", "outputs/gpu_wheels/x.whl"], cwd=REPO)
    assert proc.returncode == 0


def test_junit_counts(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="0" errors="0" skipped="1"/></testsuites>')
    assert gpu_check.junit_counts(xml) == {"tests": 3, "failures": 0, "errors": 0, "skipped": 1, "passed": 2}


def test_a_comparison_cut_short_reports_the_validations_its_log_shows(tmp_path):
    comparison = gpu_check.SslComparison(tmp_path / "work", tmp_path / "logs", tmp_path / "ssl.json")
    folder = comparison.run_dir("ceds")
    folder.mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    (folder / "train.log").write_text("x - INFO - Epoch[5] Metrics -- val_mean_dice: 0.4125 \n"
                                      "x - INFO - Epoch[10] Metrics -- val_mean_dice: 0.5500 \n")
    run = comparison.collect("ceds", "timeout", 12.34)
    assert run["validation"] == [[100, 0.4125], [200, 0.55]] and run["final_dice"] == 0.55
    assert (run["status"], run["seconds"], run["iterations"]) == ("timeout", 12.3, 300)
    assert (tmp_path / "logs" / "ssl_ceds_train.log").is_file()


@pytest.mark.integration
def test_comparison_runs_both_methods_on_the_tiny_profile(tmp_path):
    """The comparison's real plumbing (two benchmark_accuracy.py trials at once, their records) on CPU-sized
    settings; on the GPU it runs the `gpu` profile."""
    comparison = gpu_check.SslComparison(tmp_path / "work", tmp_path / "logs", tmp_path / "ssl.json", profile="tiny",
                                         phantom={}, train={"epochs": 2, "epoch_length": 2, "val_interval": 1},
                                         threads=1)
    result = comparison.run(time.time() + 240)
    assert result == json.loads((tmp_path / "ssl.json").read_text())
    assert result["status"] == "ok" and set(result["runs"]) == {"supervised", "ceds"}
    for run in result["runs"].values():
        assert run["status"] == "ok" and [i for i, _ in run["validation"]] == [2, 4]
        assert run["final_dice"] is not None and run["train_seconds"] > 0
    assert set(result["final_dice_gain"]) == {"ceds"}
    assert {"ssl_ceds_train.log", "ssl_supervised_record.json"} <= {p.name for p in (tmp_path / "logs").iterdir()}
