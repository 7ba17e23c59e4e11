"""Importing a bundle's ``scripts`` package from repository tools and tests.

Both bundles ship a package named ``scripts``, as MONAI bundles do: their configs name ``scripts.<module>.<object>``
and put ``bundle_root`` on ``sys.path`` in ``initialize``. Tools and tests that call a bundle's code directly import
its package under a name of its own, ``<bundle>_scripts`` (e.g. ``cdugjl_liver_scripts.networks``), from its file
location (:func:`bundle_module`): both bundles' code loads in one process, next to this folder's tools, with no
``sys.path`` edit and no unloading. The tools import each other as top-level modules: ``python scripts/<tool>.py``
puts this folder on ``sys.path``, and ``pytest.ini`` (``pythonpath = scripts``) does the same for the tests.

Code that instantiates a bundle's configs (``_target_: scripts.<module>...``) needs the bundle's ``scripts`` by
that name, as MONAI bundles do; :func:`use_bundle` does what the configs' ``initialize`` does, for one bundle per
process.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["BUNDLES", "bundle_module", "bundle_package", "use_bundle"]

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def _root(bundle: str | Path) -> Path:
    return (Path(bundle) if Path(bundle).is_dir() else BUNDLES / bundle).resolve()


def bundle_package(bundle: str | Path) -> ModuleType:
    """The ``scripts`` package of a bundle, imported (once) as ``<bundle folder name>_scripts``.

    Args:
        bundle: a bundle folder name under ``bundles/`` (e.g. ``"cdugjl_liver"``) or a bundle folder.
    """
    root = _root(bundle)
    name = f"{root.name}_scripts"
    if name not in sys.modules:
        folder = root / "scripts"
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        if spec is None or spec.loader is None:
            raise ImportError(f"{folder} is not a Python package (no __init__.py)")
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def bundle_module(bundle: str | Path, module: str) -> ModuleType:
    """A module of a bundle's ``scripts`` package (see :func:`bundle_package`).

    Args:
        bundle: a bundle folder name under ``bundles/`` or a bundle folder.
        module: e.g. ``"selective_scan"``.
    """
    return importlib.import_module(f"{bundle_package(bundle).__name__}.{module}")


def use_bundle(bundle: str | Path) -> Path:
    """Make the bundle's ``scripts`` the package named ``scripts``, as the configs' ``initialize`` does, so that its
    configs can be instantiated in this process; returns the bundle root.

    Another bundle's ``scripts`` modules (and its root on ``sys.path``) are forgotten first: one bundle's configs per
    process at a time.

    Args:
        bundle: a bundle folder name under ``bundles/`` or a bundle folder.
    """
    root = _root(bundle)
    loaded = sys.modules.get("scripts")
    if loaded is not None and Path(loaded.__file__ or "").resolve().parent != root / "scripts":
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]
    # no other folder with a `scripts` package (another bundle, e.g. inherited by a spawned process) before it
    sys.path[:] = [p for p in sys.path if not p or not (Path(p) / "scripts" / "__init__.py").is_file()]
    sys.path.insert(0, str(root))
    return root
