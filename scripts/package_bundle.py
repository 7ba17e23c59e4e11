"""Build a release zip of a bundle, laid out as the MONAI model zoo hosts it.

The zip holds one top folder named after the bundle (``<name>/configs``, ``<name>/scripts``, ``<name>/docs``,
``<name>/LICENSE``, ``<name>/models``), so that ``python -m monai.bundle download --name <name> --url <zip url>``
unpacks it into ``<bundle_dir>/<name>``. The file is called ``<name>_v<version>.zip`` with the version read from
``configs/metadata.json``, as in the model zoo's ``hosting_storage_v1`` release.

What goes in: ``LICENSE``, ``large_files.yml`` (if any) and everything under ``configs/``, ``scripts/`` and
``docs/``, plus ``models/model.pt`` when it exists and ``weights`` is true. What never goes in: ``__pycache__``,
compiled python files, hidden files, ``eval/`` (run outputs), any other file under ``models/`` (resume checkpoints,
best-metric checkpoints, exports) and ``configs/monailabel_train.json`` (written into the bundle by MONAI Label).
Entries are sorted and time-stamped 1980-01-01, so the same bundle always gives the same bytes.

Usage:
    python scripts/package_bundle.py bundles/ceds_mediastinum --out_dir dist
    python scripts/package_bundle.py bundles/cdugjl_liver --out_dir dist --weights False
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import fire

ZOO_FOLDERS = ("configs", "scripts", "docs")
ZOO_FILES = ("LICENSE", "large_files.yml", "large_files.yaml", "large_files.json")
REQUIRED_FILES = ("LICENSE", "configs/metadata.json")
WEIGHTS = "models/model.pt"
EXCLUDED_DIRS = {"__pycache__", "eval"}
EXCLUDED_FILES = {"configs/monailabel_train.json"}
ZOO_MAX_FILE_BYTES = 25 * 1024 * 1024  # the model zoo's limit; larger files go through large_files.yml
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

logger = logging.getLogger("package_bundle")


def bundle_files(bundle_dir: Path, weights: bool = True) -> list[str]:
    """List the files of ``bundle_dir`` that belong in its release zip.

    Args:
        bundle_dir: the bundle folder (holding ``configs/metadata.json`` and ``LICENSE``).
        weights: include ``models/model.pt`` if it exists.

    Returns:
        POSIX paths relative to ``bundle_dir``, sorted.
    """
    files = [name for name in ZOO_FILES if (bundle_dir / name).is_file()]
    for folder in ZOO_FOLDERS:
        for path in (bundle_dir / folder).rglob("*"):
            rel = path.relative_to(bundle_dir)
            if not path.is_file() or rel.as_posix() in EXCLUDED_FILES:
                continue
            if any(part in EXCLUDED_DIRS or part.startswith(".") for part in rel.parts) or path.suffix == ".pyc":
                continue
            files.append(rel.as_posix())
    if weights and (bundle_dir / WEIGHTS).is_file():
        files.append(WEIGHTS)
    return sorted(files)


def package_bundle(bundle_dir: str, out_dir: str = "dist", weights: bool = True, name: str | None = None) -> str:
    """Write ``<out_dir>/<name>_v<version>.zip`` for the bundle in ``bundle_dir``.

    Args:
        bundle_dir: the bundle folder.
        out_dir: where to write the zip (created if missing).
        weights: include ``models/model.pt`` if it exists; without it the bundle still passes
            ``check_properties()`` but needs training (or a downloaded checkpoint) before inference.
        name: bundle name, the zip's top folder; defaults to the name of ``bundle_dir``.

    Returns:
        The path of the zip written.

    Raises:
        FileNotFoundError: when ``LICENSE`` or ``configs/metadata.json`` is missing (model-zoo required files).
        ValueError: when the metadata has no ``version``.
    """
    root = Path(bundle_dir).resolve()
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not a bundle folder: missing {missing}.")
    version = json.loads((root / "configs" / "metadata.json").read_text()).get("version")
    if not version:
        raise ValueError(f"{root / 'configs' / 'metadata.json'} has no 'version'.")
    name = name or root.name
    zip_path = Path(out_dir).resolve() / f"{name}_v{version}.zip"
    zip_path.parent.mkdir(parents=True, exist_ok=True)

    files = bundle_files(root, weights=weights)
    folders = sorted({parent.as_posix() for f in files for parent in Path(f).parents} - {"."} | {"models"})
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for folder in folders:
            entry = zipfile.ZipInfo(f"{name}/{folder}/", date_time=ZIP_DATE)
            entry.external_attr = (0o40755 << 16) | 0x10
            archive.writestr(entry, b"")
        for rel in files:
            path = root / rel
            if path.stat().st_size > ZOO_MAX_FILE_BYTES:
                logger.warning(f"{rel} is larger than 25 MB: the model zoo needs it listed in large_files.yml.")
            entry = zipfile.ZipInfo(f"{name}/{rel}", date_time=ZIP_DATE)
            entry.external_attr = 0o100644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, path.read_bytes())
    with_weights = "with" if WEIGHTS in files else "without"
    logger.info(f"wrote {zip_path} ({len(files)} files, {with_weights} {WEIGHTS}).")
    return str(zip_path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fire.Fire(package_bundle)
