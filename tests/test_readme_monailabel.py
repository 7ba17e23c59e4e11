"""The README's MONAI Label block, run literally, line by line, as a new user would right after the quick start.

The repository's tracked files are copied to a fresh folder; the quick start's weights are stood in for by a random
``cpu_demo`` initialisation written where the quick start writes them (``outputs/quickstart/<bundle>/models/``,
with the ``network.json`` its training writes beside them), and ``.venv-monailabel`` is the one built for
``test_monailabel.py``. Then every command of the block runs with ``bash`` in that folder (``python`` is this
interpreter): each must exit 0, the inference call must write a NIfTI label, and each training call must rewrite the
served bundle's ``models/model.pt`` (curl exits 0 on an HTTP 500, so the effect is what is checked). The README's
commands use port 8000 (and 8010); the test is skipped when either is taken.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from conftest import REPO, cpu_demo_checkpoint

pytestmark = pytest.mark.integration

BUNDLE_NAMES = ("ceds_mediastinum", "cdugjl_liver")


def readme_block() -> list[str]:
    """The commands of the first ``bash`` block of the README's "MONAI Label" section (continuations joined)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## MONAI Label"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _served_model(repo: Path, bundle: str) -> Path:
    return repo / "outputs" / "monailabel" / "apps" / "monaibundle" / "model" / bundle / "models" / "model.pt"


def test_readme_monailabel_block_literally(monailabel_venv, tmp_path):  # noqa: F811
    commands = readme_block()
    ports = sorted({int(p) for p in re.findall(r"--port (\d+)", " ".join(commands))} | {8000})
    if not all(_port_free(p) for p in ports):
        pytest.skip(f"the README's ports {ports} are not all free on this machine")
    repo = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    (repo / ".venv-monailabel").symlink_to(monailabel_venv, target_is_directory=True)
    for bundle in BUNDLE_NAMES:
        cpu_demo_checkpoint(repo / "bundles" / bundle, repo / "outputs" / "quickstart" / bundle / "models")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = []
    try:
        for command in commands:
            train = re.search(r"/train/(\w+)", command)
            before = _served_model(repo, train.group(1)).stat().st_mtime_ns if train else None
            proc = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True,
                                  timeout=1800)
            log.append(f"$ {command}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
            assert proc.returncode == 0, "\n".join(log)
            if "/infer/" in command:
                output = repo / re.search(r"-o (\S+)", command).group(1)
                assert nib.load(str(output)).ndim == 3, "\n".join(log)
            if train:
                assert _served_model(repo, train.group(1)).stat().st_mtime_ns != before, (
                    f"{command}: the served model.pt was not rewritten\n" + "\n".join(log))
                assert "detail" not in json.loads(proc.stdout), proc.stdout  # not an HTTP error (FastAPI's body)
        left_running = (repo / "outputs" / "monailabel" / "server.json").exists()
    finally:
        subprocess.run([sys.executable, "scripts/monailabel_server.py", "stop"], cwd=repo, env=env,
                       capture_output=True, timeout=120)
    assert not left_running, "the README's block ends with a server still running"
