"""Shared test helpers: repository paths, bundle ``scripts`` switching, tiny phantom datasets.

Both bundles ship a package called ``scripts`` (the model-zoo convention), and so does no other code the tests
import: the repository tools in ``<repo>/scripts`` are imported as top-level modules (``import phantoms``).
Tests that import bundle code in-process must go through :func:`bundle_module`, which unloads the other bundle's
``scripts`` package first, exactly as MONAI Label does between bundles.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = Path(os.environ.get("MONAI_META_SCHEMA", REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"))
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"

from bundle_imports import bundle_module, use_bundle  # pytest.ini puts scripts/ on the path

# The helpers tests import from here; ``bundle_module`` is not used in this file, only re-exported for the tests.
__all__ = ["BUNDLES", "REPO", "SCHEMA_MD5", "build_monailabel_env", "bundle_module", "cpu_demo_checkpoint",
           "meta_schema", "run_cmd", "torchrun", "use_bundle"]


def meta_schema() -> Path:
    """The MONAI metadata schema 20240725, read from ``../shared/schemas`` (or ``$MONAI_META_SCHEMA``).

    The schema is not committed here; a test that needs it is skipped, saying why, when the file is absent.
    """
    if not SCHEMA.is_file():
        pytest.skip(f"metadata schema not found at {SCHEMA}; set MONAI_META_SCHEMA to its path")
    digest = hashlib.md5(SCHEMA.read_bytes()).hexdigest()
    assert digest == SCHEMA_MD5, f"{SCHEMA} has md5 {digest}, expected {SCHEMA_MD5}"
    return SCHEMA


def run_cmd(args: list[str], cwd: str | os.PathLike, timeout: float = 1200, env: dict | None = None):
    """Run a command (e.g. ``python -m monai.bundle run ...``) and fail the test with its output on error."""
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # prove the configs need no PYTHONPATH
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                    f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def torchrun() -> list[str]:
    """The ``torchrun`` launcher of the running interpreter's environment."""
    import sys

    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def cpu_demo_checkpoint(bundle_root: Path, models: Path) -> dict:
    """What a ``cpu_demo`` training run leaves in its checkpoint folder ``models``: ``model.pt`` (a seeded random
    ``network_def``) and the ``network.json`` written by train.json's own ``NetworkArgumentsSaver`` handler.

    Returns:
        the recorded network arguments.
    """
    import json

    import torch
    from ignite.engine import Engine
    from monai.bundle import ConfigParser

    use_bundle(bundle_root)
    parser = ConfigParser()
    parser.read_config([str(bundle_root / "configs" / c) for c in ("train.json", "cpu_demo.json")])
    parser["bundle_root"] = str(bundle_root)
    parser["ckpt_dir"] = str(models)
    index = next(i for i, h in enumerate(parser["train"]["handlers"])
                 if h["_target_"] == "scripts.architecture.NetworkArgumentsSaver")
    parser.get_parsed_content(f"train#handlers#{index}")(Engine(lambda engine, batch: None))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), models / "model.pt")
    return json.loads((models / "network.json").read_text())


_BUNDLE_FILES = pytest.StashKey[set]()


def _bundle_files() -> set[str]:
    """Every file under ``bundles/`` except Python caches, relative to the repository."""
    return {str(p.relative_to(REPO)) for p in BUNDLES.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BUNDLE_FILES] = _bundle_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a test (a bundle run, a repository tool) left a file inside a bundle folder: every run's
    outputs belong under its own output folder, since a bundle is what users download and MONAI Label serves."""
    before = session.config.stash.get(_BUNDLE_FILES, None)
    if before is None:
        return
    new = sorted(_bundle_files() - before)
    if new:
        pytest.exit(f"tests left {len(new)} file(s) inside bundles/: {', '.join(new[:10])}",
                    returncode=pytest.ExitCode.TESTS_FAILED)



def _phantom_dataset(tmp_path_factory, generator: str, **kwargs) -> Path:
    """Generate a tiny phantom dataset with ``phantoms.<generator>`` plus its 20 % and 100 % datalists."""
    import phantoms

    out = tmp_path_factory.mktemp(generator)
    getattr(phantoms, generator)(str(out), n_cases=8, seed=0, **kwargs)
    for ratio in (0.2, 1.0):
        phantoms.datalist(str(out), label_ratio=ratio, seed=0)
    return out


@pytest.fixture(scope="session")
def liver_data(tmp_path_factory) -> Path:
    """A tiny phantom liver-MRI dataset; returns the folder holding the cases and ``datalist_*.json``."""
    return _phantom_dataset(tmp_path_factory, "liver_mri", size=64, n_slices=8)


@pytest.fixture(scope="session")
def ct_data(tmp_path_factory) -> Path:
    """A tiny phantom mediastinal-CT dataset; returns the folder holding the cases and ``datalist_*.json``."""
    return _phantom_dataset(tmp_path_factory, "mediastinal_ct", size=64, n_slices=48)


MONAILABEL_VENV = Path(os.environ.get("MONAILABEL_VENV", REPO / ".venv-monailabel"))


def build_monailabel_env() -> subprocess.CompletedProcess:
    """Run ``scripts/monailabel_env.sh`` for :data:`MONAILABEL_VENV` (a no-op check when it is up to date)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(["bash", str(REPO / "scripts" / "monailabel_env.sh"), str(MONAILABEL_VENV)], env=env,
                          capture_output=True, text=True, timeout=1800)


def _monailabel_on_registry() -> bool:
    """Whether pip can see monailabel 0.8.5 on the configured package index (asked only when the venv is missing)."""
    import sys

    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "monailabel"], capture_output=True,
                          text=True, timeout=120)
    return proc.returncode == 0 and "0.8.5" in proc.stdout


@pytest.fixture(scope="session")
def monailabel_venv() -> Path:
    """The MONAI Label venv, built by ``scripts/monailabel_env.sh`` if needed (skip only without a registry)."""
    import time

    if not (MONAILABEL_VENV / ".monailabel-env-stamp").exists() and not _monailabel_on_registry():
        pytest.skip("the package registry is unreachable: cannot install monailabel==0.8.5 into a separate venv")
    start = time.monotonic()
    proc = build_monailabel_env()
    if proc.returncode != 0:
        pytest.fail(f"scripts/monailabel_env.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    print(f"monailabel_env.sh: {time.monotonic() - start:.0f} s\n{proc.stdout[-600:]}")
    return MONAILABEL_VENV
