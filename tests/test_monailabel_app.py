"""Unit tests of ``scripts/monailabel_server.py`` that need no MONAI Label venv: which weights a bundle is served
with."""

from __future__ import annotations

import pytest

import monailabel_server


def test_served_weights_finds_the_quick_start(tmp_path):
    """A bundle without its own ``models/model.pt`` is served with the quick start's weights, at the cpu_demo widths
    they were trained with; without ``--cpu_demo`` the error says so, and with no weights anywhere there are none."""
    name = "bundle_without_weights"  # no bundles/<name>/models/model.pt in the repository
    assert monailabel_server.served_weights(name, cpu_demo=True, weights_dir=tmp_path) is None
    quick = tmp_path / name / "models" / "model.pt"
    quick.parent.mkdir(parents=True)
    quick.write_bytes(b"weights")
    assert monailabel_server.served_weights(name, cpu_demo=True, weights_dir=tmp_path) == quick
    with pytest.raises(FileNotFoundError, match="serve with --cpu_demo"):
        monailabel_server.served_weights(name, cpu_demo=False, weights_dir=tmp_path)
    assert monailabel_server.served_weights(name, cpu_demo=True, weights_dir=None) is None
    assert monailabel_server.QUICKSTART_DIR.parts[-2:] == ("outputs", "quickstart")  # quickstart.py's --out_dir
