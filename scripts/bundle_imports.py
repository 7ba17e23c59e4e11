"""Importing a bundle's ``scripts`` package from repository tools and tests.

Both bundles ship a package named ``scripts``, so only one can be imported at a time: :func:`use_bundle` unloads
the other bundle's ``scripts`` modules and puts the bundle's root first on ``sys.path``, as the configs'
``initialize`` does.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def use_bundle(bundle: str) -> Path:
    """Make ``bundles/<bundle>/scripts`` the importable ``scripts`` package; returns the bundle root."""
    root = BUNDLES / bundle
    loaded = sys.modules.get("scripts")
    if loaded is None or Path(loaded.__file__).resolve().parent != (root / "scripts").resolve():
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]
        for other in BUNDLES.iterdir():
            while str(other) in sys.path:
                sys.path.remove(str(other))
        sys.path.insert(0, str(root))
    return root


def bundle_module(bundle: str, module: str) -> ModuleType:
    """Import ``scripts.<module>`` of ``bundles/<bundle>`` (see :func:`use_bundle`).

    Args:
        bundle: bundle folder name, e.g. ``"cdugjl_liver"``.
        module: module of the bundle's ``scripts`` package, e.g. ``"selective_scan"``.
    """
    use_bundle(bundle)
    return importlib.import_module(f"scripts.{module}")
