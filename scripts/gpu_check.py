"""The GPU check: build mamba-ssm for Hopper, run the ``gpu`` tests, the ``mamba_ssm`` scan row and a short
semi-supervised comparison at paper widths, on a lent CUDA machine that reaches no package registry.

Two commands (standard library only: ``run`` starts before anything is installed):

``prepare`` (on a machine with a registry) downloads into ``outputs/gpu_wheels/`` (ignored by git) what the CUDA
machine lacks: the mamba-ssm **sdist** (:data:`MAMBA_SSM`) and the Python 3.12 wheels of :data:`CARRIED`, and writes
``manifest.json`` (files, versions, sha256, why each one). torch and triton are never carried: the CUDA machine's own
builds are used. Nothing else is carried either (:data:`NOT_CARRIED` says why for each package one might expect).

``run`` (on the CUDA machine, from the repository root) runs these stages and writes every result to ``--out``
(default ``$OUT``, else ``outputs/gpu_check``):

==============  =====  ====================================================================================
stage           CUDA   what
==============  =====  ====================================================================================
environment     no     python, torch, CUDA, GPU and nvcc versions
wheels          no     check the carried folder against its manifest; with CUDA, ``pip install --no-index``
                       into the running interpreter's environment
patch           no     unpack the sdist, restrict its CUDA architectures to sm_90 (:data:`PATCH`, inserted
                       into its setup.py) and check that the patch took: ``setup.py build_ext`` of the
                       unpatched and of the patched source runs under a stand-in nvcc and host compiler
                       (seconds, no toolkit needed) and every nvcc command line of the patched one, and its
                       ``build.ninja``, must name ``arch=compute_90,code=sm_90`` and no other architecture
ssl             yes    ``ceds_mediastinum`` supervised vs ``ceds`` at the paper widths (``--profile gpu``), one
                       seed, a few hundred iterations, both at once, validation split only; started here, it
                       runs beside the build (its phantoms are generated while nvcc compiles)
build           yes    ``pip install -v --no-build-isolation --no-deps`` of the patched source
                       (``MAMBA_FORCE_BUILD=TRUE``, ``MAX_JOBS`` = cores)
arch_check      yes    ``build.ninja``, the nvcc lines of the build log and ``cuobjdump`` of the extension must
                       show sm_90 only (the stages after it do not wait for it)
mamba_import    yes    ``import selective_scan_cuda`` and ``mamba_ssm``'s ``selective_scan_fn``
pytest_gpu      yes    ``pytest -m gpu tests/test_liver_mamba.py`` (junit xml); a skipped test fails the stage
scan            yes    ``benchmark_speed.py scan``: the ``mamba_ssm`` row only, once ``ssl`` has finished so
                       that nothing else uses the GPU while it is timed
==============  =====  ====================================================================================

A failed stage does not stop the stages that do not depend on it. Every stage has a time limit inside one total
budget (``--budget``, default 560 s), so the whole run ends within 10 minutes, the build included.

What comes back (``--out``; the device tool returns at most 8 files, at most 2 folders down): ``summary.json``
(per stage: status, seconds, start offset, details), ``gpu_check.log``, ``pytest_gpu.xml``,
``scan_gpu_check.json``, ``ssl.json`` and ``details.tar.gz`` (every stage log, the build log, ``build.ninja``,
the training logs and records).

Exit codes of ``run``: 0 every stage passed (or was left out with ``--skip``); 1 a stage failed, timed out or
found no time left to start; 3 no CUDA here (``torch.cuda.is_available()`` false or no nvcc): every stage that
needs no CUDA passed and the run stopped before the first one that does (the CUDA stages say ``not run: no CUDA``
in ``summary.json``); 2 bad arguments.

Usage::

    python scripts/gpu_check.py prepare [--dest outputs/gpu_wheels]
    python scripts/gpu_check.py run [--out DIR] [--budget 560] [--skip ssl]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / "outputs" / "gpu_wheels"
DEFAULT_OUT = REPO / "outputs" / "gpu_check"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "gpu_check"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3

# mamba-ssm >= 2.2 (requirements-gpu.txt). 2.3.2.post1 is the newest release; its setup.py knows CUDA 13.0 (the
# lent H200's nvcc and torch+cu130) as 2.2.6 does, and its kernels carry fixes 2.2.6 lacks (64-bit strides, the
# running prefix of the forward kernel with several chunks). Its Mamba-3 extras (tilelang, quack-kernels,
# apache-tvm-ffi) are imported under try/except and not needed for the selective scan: the build uses --no-deps.
MAMBA_SSM = "2.3.2.post1"
HOPPER = "arch=compute_90,code=sm_90"
PYTHON = "3.12"  # the CUDA machine's python3
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "any")


@dataclasses.dataclass(frozen=True)
class Carried:
    """One wheel ``prepare`` downloads. ``pinned``: install exactly this version (the CUDA image lacks the
    package); otherwise it is installed only when the machine has no version of it at all."""

    name: str
    version: str
    pinned: bool
    why: str


CARRIED = (
    Carried("monai", "1.6.1", True, "the bundles' framework (requirements.txt: >=1.6.1,<1.7); not on the CUDA image"),
    Carried("pytorch-ignite", "0.5.5", True, "the bundles' training and evaluation engines; not on the image"),
    Carried("fire", "0.7.1", True, "command line of monai.bundle and of the repository scripts; not on the image"),
    Carried("termcolor", "3.3.0", True, "needed by fire; not on the image"),
    Carried("nibabel", "5.4.2", True, "NIfTI phantoms (scripts/phantoms.py) and LoadImage; not on the image"),
    Carried("einops", "0.8.2", False, "imported by mamba_ssm; on the image, carried in case it is not"),
    Carried("ninja", "1.13.0", False, "torch's extension builder runs ninja (MAX_JOBS); on the image, in case"),
    Carried("packaging", "26.4", False, "imported by mamba-ssm's setup.py; on the image, in case"),
    Carried("setuptools", "84.2.1", False, "build backend of mamba-ssm (--no-build-isolation); on the image, in case"),
    Carried("wheel", "0.48.0", False, "mamba-ssm's setup.py imports wheel.bdist_wheel; on the image, in case"),
)

NOT_CARRIED = {
    "torch, triton": "the CUDA image's own builds (torch+cu130, triton 3.6); a PyPI torch would be the wrong build",
    "numba, llvmlite": "not on the GPU path: CUDA inputs call mamba_ssm; the CPU side of the parity test falls "
                       "back to the chunked scan without numba (and the image has numba anyway)",
    "transformers, huggingface-hub": "imported by mamba_ssm/__init__.py; on the image",
    "tilelang, quack-kernels, apache-tvm-ffi": "mamba-ssm 2.3's Mamba-3 kernels only, imported under try/except; "
                                               "the build installs with --no-deps",
    "causal-conv1d": "optional: without it both Mambas use selective_scan_fn after a PyTorch convolution; it "
                     "would be a second CUDA build",
    "numpy, scipy, tqdm, tensorboard, matplotlib, onnx*, pytest, pytest-timeout": "on the image",
    "pydicom, highdicom, jsonschema": "DICOM input/output and metadata validation only; no GPU stage uses them",
}

# the semi-supervised comparison: the benchmark's `gpu` profile (the bundle's own paper widths, patch size and
# sampling) on fewer phantoms and a short schedule; the schedule fractions are the `cpu` profile's, since the
# paper's (a 5 % warm-up) assume thousands of epochs
SSL_BUNDLE = "ceds_mediastinum"
SSL_METHODS = ("supervised", "ceds")
SSL_RATIO = 20
SSL_PHANTOM = {"n_cases": 20}  # 192 x 192 x 128 voxels (gpu profile); 4 test, 4 validation, 2 labelled, 10 unlabelled
SSL_TRAIN = {"epochs": 15, "epoch_length": 20, "val_interval": 5, "checkpoint_interval": 15,  # 300 iterations
             "warmup": 1 / 3, "confidence_interval": 1 / 3, "confidence_length": 1 / 15}

# inserted into the unpacked setup.py just before its final setup(...) call: whatever -gencode/-arch/-code flags
# setup.py chose for this nvcc (nine architectures for CUDA 13.0), the extensions get sm_90 alone
PATCH_BEGIN = "# --- inserted by scripts/gpu_check.py: build for Hopper (sm_90) only ---"
PATCH_END = "# --- end of the gpu_check.py insertion ---"
PATCH = f"""{PATCH_BEGIN}
def _gpu_check_sm90_only(flags):
    kept, skip_next = [], False
    for flag in flags:
        if skip_next:
            skip_next = False
        elif flag in ("-gencode", "--generate-code", "-arch", "--gpu-architecture", "-code", "--gpu-code"):
            skip_next = True
        elif not flag.startswith(("-gencode=", "--generate-code=", "-arch=", "--gpu-architecture=", "-code=",
                                  "--gpu-code=")):
            kept.append(flag)
    return kept + ["-gencode", "{HOPPER}"]


for _gpu_check_ext in ext_modules:
    if isinstance(_gpu_check_ext.extra_compile_args, dict) and "nvcc" in _gpu_check_ext.extra_compile_args:
        _gpu_check_ext.extra_compile_args["nvcc"] = _gpu_check_sm90_only(_gpu_check_ext.extra_compile_args["nvcc"])
{PATCH_END}
"""

# `setup.py build_ext` under stand-ins: python -c STANDIN_BUILD <source> <stand-in CUDA_HOME> <CUDA version>. The
# stand-in nvcc answers -V with that version, records every other command line and fails, so the build stops at
# its first CUDA compile, after torch's BuildExtension has written build.ninja and started nvcc with the real flags.
STANDIN_BUILD = """
import os, runpy, sys
source, home, version = sys.argv[1:4]
import torch, torch.utils.cpp_extension as cpp
torch.version.cuda = version  # the CUDA torch was built with, as setup.py compares it with nvcc's
cpp.CUDA_HOME = home
os.chdir(source)
sys.path.insert(0, source)
sys.argv = ["setup.py", "build_ext"]
runpy.run_path("setup.py", run_name="__main__")
"""
STANDIN_NVCC = """#!{python}
import json, os, sys
if "-V" in sys.argv or "--version" in sys.argv:
    print("nvcc: a stand-in of scripts/gpu_check.py")
    print("Cuda compilation tools, release {version}, V{version}.0")
    sys.exit(0)
with open(os.environ["GPU_CHECK_NVCC_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(1)
"""
# the host compiler: torch checks its name and version; the C++ file it is given is not compiled
STANDIN_CXX = """#!/bin/sh
case "$*" in
  *-dumpfullversion*|*-dumpversion*) echo 12.2.0;;
  -v|--version) echo "gcc version 12.2.0 (a stand-in of scripts/gpu_check.py)" >&2;;
esac
exit 0
"""

# the environment stage (a subprocess, so that a torch that does not import fails the stage, not the check)
ENVIRONMENT = """
import json, os, platform, shutil, subprocess, sys, torch
from torch.utils.cpp_extension import CUDA_HOME

def output(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()

cuda = torch.cuda.is_available()
nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
smi = shutil.which("nvidia-smi")
print(json.dumps({
    "python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
    "torch_cuda": torch.version.cuda, "cuda_available": cuda,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
    "cuda_home": CUDA_HOME,
    "nvcc": output(nvcc, "-V").splitlines()[-2:] if nvcc and os.path.exists(nvcc) else None,
    "nvidia_smi": output(smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader") if smi else None,
    "cpu_count": os.cpu_count(),
}))
"""


# ----------------------------------------------------------------------------------------------------- prepare


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(args: list[str], dest: Path, env: dict | None = None) -> Path:
    """``pip download`` into an empty ``dest``; returns the one file it saved."""
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--retries", "2",
           "--timeout", "30", "-d", str(dest), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    files = list(dest.iterdir())
    if proc.returncode != 0 or len(files) != 1:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return files[0]


def download_sdist(dest: Path, version: str = MAMBA_SSM) -> Path:
    """The mamba-ssm sdist into an empty folder ``dest``. pip prepares its metadata with the local torch;
    ``MAMBA_SKIP_CUDA_BUILD`` lets setup.py do so without nvcc."""
    return _pip_download(["--no-binary", ":all:", "--no-build-isolation", f"mamba-ssm=={version}"], dest,
                         env={"MAMBA_SKIP_CUDA_BUILD": "TRUE"})


def download_wheel(item: Carried, dest: Path) -> Path:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    return _pip_download(["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp", *platforms,
                          f"{item.name}=={item.version}"], dest)


def prepare(dest: Path = WHEEL_DIR, mamba_version: str = MAMBA_SSM) -> dict:
    """Download the sdist and the wheels into a fresh ``dest`` (replaced whole, so it holds one version of each)
    and write ``dest/manifest.json``; returns the manifest."""
    dest = Path(dest)
    staging = Path(tempfile.mkdtemp(prefix="gpu_wheels_", dir=dest.parent if dest.parent.is_dir() else None))
    try:
        sdist = download_sdist(staging / "sdist", mamba_version)
        files = [{"name": "mamba-ssm", "version": mamba_version, "kind": "sdist", "pinned": True,
                  "why": "built on the CUDA machine for sm_90 only", "path": sdist}]
        for i, item in enumerate(CARRIED):
            print(f"downloading {item.name}=={item.version}", flush=True)
            path = download_wheel(item, staging / f"w{i}")
            files.append({"name": item.name, "version": item.version, "kind": "wheel", "pinned": item.pinned,
                          "why": item.why, "path": path})
        final = staging / "final"
        final.mkdir()
        for f in files:
            path = Path(shutil.move(str(f.pop("path")), final))
            f.update(file=path.name, bytes=path.stat().st_size, sha256=sha256(path))
        manifest = {"python": PYTHON, "platforms": list(PLATFORMS), "mamba_ssm": mamba_version, "files": files,
                    "total_bytes": sum(f["bytes"] for f in files), "not_carried": NOT_CARRIED}
        (final / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(final), dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for f in files:
        print(f"  {f['file']:70s} {f['bytes'] / 2**20:7.2f} MiB  {f['why']}")
    print(f"total {manifest['total_bytes'] / 2**20:.2f} MiB in {dest}")
    print("not carried: " + "; ".join(f"{k}: {v}" for k, v in NOT_CARRIED.items()))
    rel = dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest
    print(f'device command: bash scripts/gpu_check.sh run --out "$OUT"   (carry: {rel})')
    return manifest


def load_manifest(wheel_dir: Path) -> dict:
    """The manifest of a prepared folder, after checking that every file it lists is there, unchanged, and that
    nothing else is (one version of each package)."""
    if not (wheel_dir / "manifest.json").is_file():
        raise RuntimeError(f"{wheel_dir}/manifest.json not found: run `bash scripts/gpu_check.sh prepare` first "
                           "(and carry that folder)")
    manifest = json.loads((wheel_dir / "manifest.json").read_text())
    listed = {f["file"] for f in manifest["files"]}
    extra = sorted(p.name for p in wheel_dir.iterdir() if p.name != "manifest.json" and p.name not in listed)
    if extra:
        raise RuntimeError(f"files not in the manifest: {extra} (run prepare again)")
    for f in manifest["files"]:
        path = wheel_dir / f["file"]
        if not path.is_file() or sha256(path) != f["sha256"]:
            raise RuntimeError(f"{path} is missing or changed (run prepare again)")
    return manifest


# ----------------------------------------------------------------------------------------------------- patch


def patch_setup(source: Path) -> None:
    """Insert :data:`PATCH` before the top-level ``setup(`` call of ``source/setup.py`` (once)."""
    setup_py = source / "setup.py"
    text = setup_py.read_text()
    if PATCH_BEGIN in text:
        return
    calls = [m.start() for m in re.finditer(r"^setup\(", text, re.MULTILINE)]
    if len(calls) != 1:
        raise RuntimeError(f"expected one top-level setup( call in {setup_py}, found {len(calls)}")
    if "ext_modules" not in text[: calls[0]]:
        raise RuntimeError(f"{setup_py} defines no ext_modules before setup(: not the expected mamba-ssm layout")
    setup_py.write_text(text[: calls[0]] + PATCH + "\n\n" + text[calls[0]:])


def arch_flags(flags: list[str]) -> list[str]:
    """The architecture arguments among nvcc ``flags``: ``-gencode X`` / ``-gencode=X`` give ``X``; the ``-arch``
    and ``-code`` forms give ``-arch=...`` / ``-code=...``."""
    names = {"-gencode": "", "--generate-code": "", "-arch": "-arch=", "--gpu-architecture": "-arch=",
             "-code": "-code=", "--gpu-code": "-code="}
    found, it = [], iter(flags)
    for flag in it:
        name, eq, value = flag.partition("=")
        if name in names:
            found.append(names[name] + (value if eq else next(it, "")))
    return found


def ninja_arch_flags(text: str) -> list[str]:
    """The distinct architecture arguments of a ``build.ninja`` (its nvcc flag lines)."""
    flags = [f for line in text.splitlines() if "cflags" in line for f in line.partition("=")[2].split()]
    return sorted(set(arch_flags(flags)))


def standin_build(source: Path, work: Path, cuda_version: str) -> dict:
    """Run ``setup.py build_ext`` of ``source`` with a stand-in nvcc reporting ``cuda_version`` and a stand-in
    host compiler (seconds, no GPU or CUDA toolkit needed), then remove its ``build/`` folder.

    Returns:
        ``nvcc``: the command lines nvcc was started with; ``build_ninja``: the text of torch's ``build.ninja``
        (None when the build ran without ninja).
    """
    home, hostbin, log = work / "standin" / "cuda", work / "standin" / "bin", work / "standin" / "nvcc.jsonl"
    (home / "bin").mkdir(parents=True, exist_ok=True)
    hostbin.mkdir(parents=True, exist_ok=True)
    (home / "bin" / "nvcc").write_text(STANDIN_NVCC.format(python=sys.executable, version=cuda_version))
    (hostbin / "g++").write_text(STANDIN_CXX)
    for f in (home / "bin" / "nvcc", hostbin / "g++"):
        f.chmod(0o755)
    log.unlink(missing_ok=True)
    shutil.rmtree(source / "build", ignore_errors=True)
    env = {**os.environ, "GPU_CHECK_NVCC_LOG": str(log), "MAMBA_FORCE_BUILD": "TRUE", "MAX_JOBS": "4",
           "CC": str(hostbin / "g++"), "CXX": str(hostbin / "g++")}
    for key in ("MAMBA_SKIP_CUDA_BUILD", "TORCH_CUDA_ARCH_LIST"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", STANDIN_BUILD, str(source), str(home), cuda_version], env=env,
                          capture_output=True, text=True, timeout=300)
    nvcc = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    ninja = sorted(source.glob("build/**/build.ninja"))
    result = {"nvcc": nvcc, "build_ninja": ninja[0].read_text() if ninja else None}
    shutil.rmtree(source / "build", ignore_errors=True)
    if not nvcc:
        raise RuntimeError(f"setup.py build_ext started no nvcc (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return result


def unpack_and_patch(sdist: Path, work: Path, cuda_version: str) -> tuple[Path, dict]:
    """Unpack ``sdist`` into ``work/src``, restrict it to sm_90 and check that the patch took: a stand-in build
    (:func:`standin_build`) of the unpatched and of the patched source, whose every nvcc command line (and
    ``build.ninja``) must then name :data:`HOPPER` and no other architecture.

    Returns:
        the source folder, and for ``summary.json`` the architectures before and after, the nvcc command lines
        seen and whether a ``build.ninja`` was checked.
    """
    target = work / "src"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(target, filter="data")
    (source,) = [p for p in target.iterdir() if p.is_dir()]
    before = standin_build(source, work, cuda_version)
    patch_setup(source)
    after = standin_build(source, work, cuda_version)
    for argv in after["nvcc"]:
        if arch_flags(argv) != [HOPPER]:
            raise RuntimeError(f"the patched build runs nvcc with {arch_flags(argv)}, expected only {HOPPER}: "
                               + " ".join(argv))
    if after["build_ninja"] is not None and ninja_arch_flags(after["build_ninja"]) != [HOPPER]:
        raise RuntimeError(f"the patched build.ninja names {ninja_arch_flags(after['build_ninja'])}")
    (work / "standin" / "nvcc_patched.json").write_text(json.dumps(after["nvcc"], indent=1))
    return source, {"cuda_version": cuda_version,
                    "before": sorted(set(f for argv in before["nvcc"] for f in arch_flags(argv))),
                    "after": sorted(set(f for argv in after["nvcc"] for f in arch_flags(argv))),
                    "nvcc_commands_seen": len(after["nvcc"]), "build_ninja_checked": after["build_ninja"] is not None}


# ----------------------------------------------------------------------------------------------------- run


# every child started in a process group of its own (so that a timeout can end it with its workers, nvcc
# processes, data loaders); finish() ends any still running, so that none outlives the check
CHILDREN: list[subprocess.Popen] = []


def start(cmd: list[str], stdout, env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` from the repository root in a new process group (in the same session: the device tool ends
    the session's processes when the command returns)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=stdout, stderr=subprocess.STDOUT, process_group=0,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    CHILDREN.append(proc)
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def kill_children() -> None:
    for proc in CHILDREN:
        if proc.poll() is None:
            kill_group(proc)


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> int:
    """Run ``cmd`` with its output appended to ``log``; on timeout its whole process group is killed and
    :class:`subprocess.TimeoutExpired` raised."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = start(cmd, f, env)
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise


def tail(path: Path, lines: int = 40) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []


class StageFailed(Exception):
    """A stage's own verdict of failure (its message goes to ``summary.json``)."""


@dataclasses.dataclass
class Stage:
    name: str
    needs_cuda: bool
    status: str = "pending"
    seconds: float | None = None
    start_s: float | None = None
    detail: dict = dataclasses.field(default_factory=dict)
    error: str | None = None


class GpuCheck:
    """The ``run`` command: stages, their budget and the summary."""

    def __init__(self, out: Path, work: Path, wheel_dir: Path, budget: float, skip: list[str], jobs: int,
                 standin_cuda: str, ssl_settings: dict | None = None) -> None:
        self.out, self.work, self.wheel_dir = Path(out), Path(work), Path(wheel_dir)
        self.budget, self.skip, self.jobs, self.standin_cuda = budget, set(skip), jobs, standin_cuda
        self.ssl_settings = ssl_settings or {}
        self.t0 = time.time()
        self.deadline = self.t0 + budget
        self.logs = self.work / "logs"
        self.stages = {s.name: s for s in (  # in the order they start
            Stage("environment", False), Stage("wheels", False), Stage("patch", False), Stage("ssl", True),
            Stage("build", True), Stage("arch_check", True), Stage("mamba_import", True), Stage("pytest_gpu", True),
            Stage("scan", True))}
        self.environment: dict = {}
        self.cuda = False
        self.source: Path | None = None
        self.manifest: dict | None = None

    # -- bookkeeping
    def log(self, message: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {message}"
        print(line, flush=True)
        with open(self.out / "gpu_check.log", "a") as f:
            f.write(line + "\n")

    def remaining(self) -> float:
        return self.deadline - time.time()

    def ok(self, *names: str) -> bool:
        return all(self.stages[n].status == "ok" for n in names)

    def gate(self, name: str, needs: tuple[str, ...], min_s: float) -> bool:
        """Whether stage ``name`` may start; if not, its status says why (skipped, needs CUDA that is not here,
        needs a stage that did not pass, or the budget is spent)."""
        st = self.stages[name]
        failed_needs = [n for n in needs if not self.ok(n)]
        if name in self.skip:
            st.status = "skipped: --skip"
        elif st.needs_cuda and not self.cuda:
            st.status = "not run: no CUDA"
        elif failed_needs:
            st.status = f"skipped: needs {', '.join(failed_needs)}"
        elif self.remaining() < min_s:
            st.status = "skipped: out of time"
        else:
            st.start_s = round(time.time() - self.t0, 1)
            self.log(f"{name}: start")
            return True
        self.log(f"{name}: {st.status}")
        return False

    def done(self, st: Stage, status: str, began: float, error: str | None = None) -> None:
        st.status, st.error, st.seconds = status, error, round(time.time() - began, 1)
        log = self.logs / f"{st.name}.log"
        if status != "ok" and log.is_file():
            st.detail["log_tail"] = tail(log)
        self.log(f"{st.name}: {status} ({st.seconds} s)" + (f": {error.splitlines()[0]}" if error else ""))

    def stage(self, name: str, fn: Callable[[Stage], None], needs: tuple[str, ...] = (), min_s: float = 5) -> None:
        """Run stage ``name`` if :meth:`gate` lets it: ``fn(stage)`` fills ``stage.detail``; raising fails it."""
        if not self.gate(name, needs, min_s):
            return
        st, began = self.stages[name], time.time()
        try:
            fn(st)
            self.done(st, "ok", began)
        except subprocess.TimeoutExpired as e:
            self.done(st, "timeout", began, f"timed out after {e.timeout:.0f} s")
        except Exception as e:  # a stage's failure is recorded, and the independent stages still run
            self.done(st, "failed", began, f"{type(e).__name__}: {e}")

    def python(self, code: str, log: Path, timeout: float) -> Any:
        """Run python ``code`` that prints one JSON line; returns the last JSON line of its output."""
        rc = run_logged([sys.executable, "-c", code], log, timeout)
        if rc != 0:
            raise StageFailed(f"exit {rc}")
        for line in reversed(tail(log, 20)):
            try:
                return json.loads(line)
            except ValueError:
                continue
        raise StageFailed("it printed no JSON")

    # -- stages
    def st_environment(self, st: Stage) -> None:
        self.environment = self.python(ENVIRONMENT, self.logs / "environment.log", min(120, self.remaining()))
        st.detail.update(self.environment)
        self.cuda = bool(self.environment["cuda_available"] and self.environment["nvcc"])

    def st_wheels(self, st: Stage) -> None:
        self.manifest = load_manifest(self.wheel_dir)
        st.detail["files"] = [f["file"] for f in self.manifest["files"]]
        st.detail["total_mib"] = round(self.manifest["total_bytes"] / 2**20, 2)
        if not self.cuda:
            st.detail["install"] = "not run: no CUDA (it would change this machine's environment)"
            return
        wheels = [f for f in self.manifest["files"] if f["kind"] == "wheel"]
        reqs = [f"{f['name']}=={f['version']}" if f["pinned"] else f["name"] for f in wheels]
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(self.wheel_dir),
               "--disable-pip-version-check", "--no-cache-dir", "--no-compile", *reqs]
        rc = run_logged(cmd, self.logs / "wheels.log", min(180, self.remaining()))
        if rc != 0:
            raise StageFailed(f"pip install exit {rc}")
        st.detail["install"] = "ok"

    def st_patch(self, st: Stage) -> None:
        if self.manifest is None:
            self.manifest = load_manifest(self.wheel_dir)
        (sdist,) = [f["file"] for f in self.manifest["files"] if f["kind"] == "sdist"]
        # the stand-in nvcc reports the real nvcc's version where there is one, so that setup.py picks the same
        # architectures as the real build will
        real = re.search(r"release (\d+\.\d+)", " ".join(self.environment.get("nvcc") or []))
        version = real.group(1) if real else self.standin_cuda
        self.source, flags = unpack_and_patch(self.wheel_dir / sdist, self.work, version)
        shutil.copy(self.work / "standin" / "nvcc_patched.json", self.logs / "standin_nvcc_patched.json")
        st.detail.update({"sdist": sdist, "source": str(self.source), "arch_flags": flags,
                          "cuda_version_from": "nvcc" if real else "--standin_cuda"})

    def st_build(self, st: Stage) -> None:
        env = {"MAMBA_FORCE_BUILD": "TRUE", "MAX_JOBS": str(self.jobs), "TORCH_CUDA_ARCH_LIST": "9.0"}
        cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-index", "--no-deps",
               "--no-cache-dir", "--disable-pip-version-check", str(self.source)]
        st.detail["env"] = env
        # leave time for the stages that use the build (arch_check, mamba_import, pytest_gpu, scan: about 150 s)
        rc = run_logged(cmd, self.logs / "build.log", self.remaining() - 170, env)
        if rc != 0:
            raise StageFailed(f"pip install exit {rc}")

    def st_arch_check(self, st: Stage) -> None:
        """The patch took if every architecture the build names is sm_90: in build.ninja (pip builds a local folder
        in place), in the nvcc lines of the build log (pip -v) and in the extension's device code (cuobjdump). A
        source that shows nothing is recorded as such; the stage fails on a wrong architecture, or if no source
        showed any."""
        seen: dict[str, Any] = {}
        ninja = sorted(self.source.glob("build/**/build.ninja"))
        if ninja:
            shutil.copy(ninja[0], self.logs / "build.ninja")
            seen["build_ninja"] = ninja_arch_flags(ninja[0].read_text())
        seen["build_log"] = sorted(set(re.findall(r"arch=compute_\w+,code=\w+", (self.logs / "build.log").read_text())))
        so = self.python("import importlib.util, json; spec = importlib.util.find_spec('selective_scan_cuda'); "
                         "print(json.dumps(spec.origin if spec else None))", self.logs / "arch_check.log", 60)
        st.detail["extension"] = so
        home = self.environment.get("cuda_home")
        cuobjdump = shutil.which("cuobjdump") or (os.path.join(home, "bin", "cuobjdump") if home else "")
        if so and os.path.exists(cuobjdump):
            listing = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", so], capture_output=True, text=True)
            (self.logs / "cuobjdump.txt").write_text(listing.stdout + listing.stderr)
            seen["cubins"] = sorted(set(re.findall(r"\.(sm_\w+)\.cubin", listing.stdout)))
            seen["ptx"] = sorted(set(re.findall(r"\.(sm_\w+)\.ptx", listing.stdout)))
        st.detail["arch_seen"] = seen
        wanted = {"build_ninja": [HOPPER], "build_log": [HOPPER], "cubins": ["sm_90"]}
        wrong = {k: v for k, v in seen.items() if v and v != wanted.get(k)}  # any PTX is wrong: code=sm_90 only
        if wrong:
            raise StageFailed(f"architectures other than sm_90: {wrong}")
        if not any(seen.get(k) for k in wanted):
            raise StageFailed("neither build.ninja, the build log nor cuobjdump showed an architecture")

    def st_mamba_import(self, st: Stage) -> None:
        st.detail.update(self.python(
            "import json, selective_scan_cuda, mamba_ssm\n"
            "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn\n"
            "print(json.dumps({'mamba_ssm': mamba_ssm.__version__, 'extension': selective_scan_cuda.__file__}))",
            self.logs / "mamba_import.log", min(120, self.remaining())))

    def st_pytest_gpu(self, st: Stage) -> None:
        xml = self.out / "pytest_gpu.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_liver_mamba.py", "-p", "no:cacheprovider",
               "-rA", f"--junitxml={xml}"]
        rc = run_logged(cmd, self.logs / "pytest_gpu.log", min(180, self.remaining() - 60))
        counts = junit_counts(xml) if xml.is_file() else {}
        st.detail.update({"exit_code": rc, **counts})
        if rc != 0 or not counts.get("passed") or counts.get("skipped"):
            raise StageFailed(f"pytest exit {rc}, {counts}: every gpu test must run and pass")

    def st_scan(self, st: Stage) -> None:
        cmd = [sys.executable, "scripts/benchmark_speed.py", "scan", "--lengths", "[]", "--out_dir", str(self.out),
               "--tag", "gpu_check"]
        rc = run_logged(cmd, self.logs / "scan.log", min(150, self.remaining() - 15))
        result = self.out / "scan_gpu_check.json"
        rows = json.loads(result.read_text())["rows"] if result.is_file() else []
        row = next((r for r in rows if r.get("method") == "mamba_ssm"), {})
        st.detail.update({k: row.get(k) for k in ("status", "length", "time_s", "baseline_time_s", "speedup",
                                                  "peak_mb", "baseline_peak_mb", "max_abs_error")})
        if rc != 0 or row.get("status") != "ok":
            raise StageFailed(f"scan exit {rc}, mamba_ssm row: {row.get('status')}")

    # -- the whole run
    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        (self.out / "gpu_check.log").write_text("")
        self.log(f"gpu_check run: out {self.out}, work {self.work}, budget {self.budget:.0f} s")
        self.stage("environment", self.st_environment)
        self.stage("wheels", self.st_wheels)
        self.stage("patch", self.st_patch)
        if not self.cuda:
            self.log("no CUDA here (torch.cuda.is_available() is false or there is no nvcc): stopping before the "
                     "stages that need it (the comparison, the build and what uses the build)")
        ssl = self.start_ssl()  # beside the build: it needs neither the build nor the GPU's full attention
        self.stage("build", self.st_build, needs=("patch",), min_s=230)
        self.stage("arch_check", self.st_arch_check, needs=("build",))  # its failure blocks nothing
        self.stage("mamba_import", self.st_mamba_import, needs=("build",))
        self.stage("pytest_gpu", self.st_pytest_gpu, needs=("mamba_import", "wheels"))
        if ssl is not None:
            self.finish_ssl(*ssl)  # before the scan, so that nothing else uses the GPU while it is timed
        self.stage("scan", self.st_scan, needs=("mamba_import", "wheels"), min_s=30)
        return self.finish()

    def start_ssl(self) -> tuple[threading.Thread, dict, float] | None:
        """Start the comparison in a thread, with a deadline that leaves time for the scan after it."""
        if not self.gate("ssl", ("wheels",), min_s=150):
            return None
        comparison, result = SslComparison(self.work / "ssl", self.logs, self.out / "ssl.json",
                                           **self.ssl_settings), {}

        def target() -> None:
            try:
                result.update(comparison.run(self.deadline - 75))
            except Exception as e:  # reported by finish_ssl
                result["error"] = f"{type(e).__name__}: {e}"

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.stages["ssl"].status = "running"
        return thread, result, time.time()

    def finish_ssl(self, thread: threading.Thread, result: dict, began: float) -> None:
        self.log("ssl: waiting for the comparison")
        thread.join(max(1.0, self.remaining() - 60))
        st = self.stages["ssl"]
        st.detail.update(result)
        if thread.is_alive():
            self.done(st, "timeout", began, "the comparison did not finish in its budget")
        elif result.get("error") or result.get("status") != "ok":
            failed = {m: r["status"] for m, r in result.get("runs", {}).items() if r["status"] != "ok"}
            self.done(st, "failed", began, result.get("error") or f"runs not ok: {failed}")
        else:
            self.done(st, "ok", began)

    def finish(self) -> int:
        kill_children()
        failed = [s.name for s in self.stages.values() if s.status in ("failed", "timeout", "skipped: out of time")]
        code = EXIT_FAILED if failed else (EXIT_OK if self.cuda else EXIT_NO_CUDA)
        result = {EXIT_OK: "passed", EXIT_FAILED: "failed", EXIT_NO_CUDA: "no_cuda"}[code]
        summary = {
            "check": "scripts/gpu_check.py run",
            "result": result,
            "exit_code": code,
            "failed": failed,
            "cuda": self.cuda,
            "budget_s": self.budget,
            "seconds": round(time.time() - self.t0, 1),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0)),
            "environment": self.environment,
            "stages": [dataclasses.asdict(s) for s in self.stages.values()],
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        shutil.copy(self.out / "summary.json", self.logs / "summary.json")
        with tarfile.open(self.out / "details.tar.gz", "w:gz") as tar:
            tar.add(self.logs, arcname="details")
        self.log(f"{result}: exit {code}" + (f", failed: {', '.join(failed)}" if failed else "")
                 + (" (no CUDA: stopped before the stages that need it)" if code == EXIT_NO_CUDA else ""))
        return code


def junit_counts(xml: Path) -> dict:
    """``tests``, ``failures``, ``errors``, ``skipped`` and ``passed`` of a pytest junit xml."""
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


# the validation lines of a training log, as benchmark_accuracy.validation_curve reads them
VALIDATION = re.compile(r"Epoch\[(\d+)\] Metrics -- [\w]+: ([-\d.eE+naif]+)")


class SslComparison:
    """Supervised vs the bundle's semi-supervised method, one ``benchmark_accuracy.py trial`` each, both at once.

    Writes ``out_json``: per method the status, the wall time, the validation curve (from the trial's record, or
    read from the training log of a run cut short) and the final validation Dice, plus ``final_dice_gain`` (the
    method minus supervised).
    """

    def __init__(self, work: Path, logs: Path, out_json: Path, bundle: str = SSL_BUNDLE,
                 methods: tuple[str, ...] = SSL_METHODS, ratio: int = SSL_RATIO, seed: int = 0, profile: str = "gpu",
                 phantom: dict | None = None, train: dict | None = None, threads: int = 2) -> None:
        self.work, self.logs, self.out_json = Path(work), Path(logs), Path(out_json)
        self.bundle, self.methods, self.ratio, self.seed, self.profile = bundle, tuple(methods), ratio, seed, profile
        self.phantom = SSL_PHANTOM if phantom is None else phantom
        self.train = SSL_TRAIN if train is None else train
        self.threads = threads

    def run_dir(self, method: str) -> Path:
        # benchmark_accuracy.trial's layout: <work_dir>/trials/<name>/<profile>/<bundle>/<variant>/<run>
        return self.work / "trials" / "gpu_check" / self.profile / self.bundle / "trial" / (
            f"r{self.ratio:03d}_{method}_s{self.seed}")

    def command(self, method: str) -> list[str]:
        return [sys.executable, "scripts/benchmark_accuracy.py", "trial", "--bundle", self.bundle, "--name",
                "gpu_check", "--ratio", str(self.ratio), "--seed", str(self.seed), "--method", method,
                "--profile", self.profile, "--phantom", repr(self.phantom), "--train", repr(self.train),
                "--threads", str(self.threads), "--work_dir", str(self.work)]

    def run(self, deadline: float) -> dict:
        shutil.rmtree(self.work, ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        procs, files = {}, []
        for method in self.methods:
            log = open(self.logs / f"ssl_{method}.log", "w")
            files.append(log)
            cmd = self.command(method)
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            procs[method] = (start(cmd, log), time.time())
        runs = {}
        for method, (proc, started) in procs.items():
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.time()))
                status = "ok" if rc == 0 else f"failed: exit {rc}"
            except subprocess.TimeoutExpired:
                kill_group(proc)
                status = "timeout"
            runs[method] = self.collect(method, status, time.time() - started)
        for f in files:
            f.close()
        supervised = runs.get("supervised", {}).get("final_dice")
        result = {"bundle": self.bundle, "profile": self.profile, "ratio": self.ratio, "seed": self.seed,
                  "phantom": self.phantom, "train": self.train, "split": "validation (the test split is not used)",
                  "status": "ok" if all(r["status"] == "ok" for r in runs.values()) else "failed", "runs": runs,
                  "final_dice_gain": {m: r["final_dice"] - supervised for m, r in runs.items()
                                      if m != "supervised" and r.get("final_dice") is not None
                                      and supervised is not None}}
        self.out_json.write_text(json.dumps(result, indent=1) + "\n")
        return result

    def collect(self, method: str, status: str, seconds: float) -> dict:
        folder = self.run_dir(method)
        record = folder.parent / f"{folder.name}.json"
        train_log = folder / "train.log"
        if train_log.is_file():
            shutil.copy(train_log, self.logs / f"ssl_{method}_train.log")
        if record.is_file():
            shutil.copy(record, self.logs / f"ssl_{method}_record.json")
            rec = json.loads(record.read_text())
            curve, train_s = rec["validation"], rec["seconds"].get("train")
        else:  # cut short: the validations its log shows
            epoch_length = int(self.train.get("epoch_length") or 1)
            text = train_log.read_text(errors="replace") if train_log.is_file() else ""
            curve = [[int(m.group(1)) * epoch_length, float(m.group(2))] for m in VALIDATION.finditer(text)]
            train_s = None
        iterations = int(self.train.get("epochs", 0)) * int(self.train.get("epoch_length") or 0) or None
        return {"status": status, "seconds": round(seconds, 1), "train_seconds": train_s, "iterations": iterations,
                "validation": curve, "final_dice": curve[-1][1] if curve else None}


# ----------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download the mamba-ssm sdist and the missing wheels (needs a registry)")
    p.add_argument("--dest", type=Path, default=WHEEL_DIR, help="the folder to carry (replaced whole)")
    p.add_argument("--mamba_version", default=MAMBA_SSM)
    r = sub.add_parser("run", help="the GPU check (stops before the build where there is no CUDA: exit 3)")
    r.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT,
                   help="results folder (default $OUT, else outputs/gpu_check)")
    r.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder (source, build, data, logs)")
    r.add_argument("--wheels", type=Path, default=WHEEL_DIR, help="the folder prepare filled")
    r.add_argument("--budget", type=float, default=560, help="seconds for the whole run (default 560)")
    r.add_argument("--skip", nargs="*", default=[],
                   choices=["ssl", "build", "arch_check", "mamba_import", "pytest_gpu", "scan"])
    r.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="MAX_JOBS of the build (default: cores)")
    r.add_argument("--ssl_phantom", type=json.loads, default={},
                   help=f"JSON merged into the comparison's phantom arguments {SSL_PHANTOM}")
    r.add_argument("--ssl_train", type=json.loads, default={},
                   help=f"JSON merged into the comparison's training overrides {SSL_TRAIN}")
    r.add_argument("--standin_cuda", default="13.0",
                   help="where there is no nvcc, the CUDA version the patch check's stand-in nvcc reports (13.0: "
                        "the lent H200's)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        try:
            prepare(args.dest, args.mamba_version)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"prepare failed: {e}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    ssl = {"phantom": {**SSL_PHANTOM, **args.ssl_phantom}, "train": {**SSL_TRAIN, **args.ssl_train}}
    check = GpuCheck(args.out, args.work, args.wheels, args.budget, args.skip, args.jobs, args.standin_cuda, ssl)
    signal.signal(signal.SIGTERM, lambda *_: (kill_children(), sys.exit(EXIT_FAILED)))
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
