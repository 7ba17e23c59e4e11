"""Reading the MSD-style datalists of the bundles of this collection.

A datalist is a JSON file with the splits ``training`` (labelled records), ``unlabeled`` (records without
``label``/``organs``), ``validation`` and ``test``; a record of the liver bundle looks like::

    {"case": "liver_000",
     "image": ["imagesTr/liver_000_t2w.nii.gz", "imagesTr/liver_000_dwi.nii.gz"],
     "ce": ["imagesTr/liver_000_art.nii.gz", "imagesTr/liver_000_pv.nii.gz", "imagesTr/liver_000_delay.nii.gz"],
     "label": "labelsTr/liver_000.nii.gz", "organs": "organsTr/liver_000.nii.gz"}

and one of the CT bundle ``{"case", "image", "label", "organs"}``, with paths relative to the datalist's folder
(absolute paths are kept). ``monai.data.load_decathlon_datalist`` joins only ``image``/``label`` unconditionally and
joins other keys only when the joined path happens to exist (so a ``case`` name equal to a file name would be
rewritten); :func:`load_datalist` instead resolves exactly the path-valued keys in :data:`PATH_KEYS` (the same
``normpath(join(base_dir, path))`` rule) and leaves every other key untouched.

The contrast-enhanced phases are ``ce``, a name that MONAI 1.6's ``Spacingd`` leaves alone (it treats every entry
named ``image_*`` as a meta dict of ``image``); liver datalists of bundle versions before 0.5.0 named them
``image_ce``, which :func:`load_datalist` still reads (with a warning).

Each bundle is downloaded alone, so each ships this module; the copies are identical (``tests/test_common.py``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

__all__ = ["PATH_KEYS", "SPLITS", "load_datalist"]

logger = logging.getLogger(__name__)

PATH_KEYS: tuple[str, ...] = ("image", "ce", "label", "organs")
"""Record keys holding a file path (``str``) or a list of file paths, resolved against the datalist's folder."""

SPLITS: tuple[str, ...] = ("training", "unlabeled", "validation", "test")
"""The split keys a bundle datalist may hold; ``unlabeled`` may be absent (fully supervised datalists)."""


def _resolve(base_dir: str, key: str, value: str | Sequence[str], where: str) -> str | list[str]:
    """Join ``value`` (a path or a list of paths) to ``base_dir``; absolute paths are kept as they are."""
    if isinstance(value, str):
        return os.path.normpath(os.path.join(base_dir, value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return [os.path.normpath(os.path.join(base_dir, v)) for v in value]
    raise TypeError(f"{where}: '{key}' must be a path or a non-empty list of paths, got {value!r}.")


def load_datalist(
    datalist: str | os.PathLike,
    split: str,
    image_key: str = "image",
    base_dir: str | os.PathLike | None = None,
    check_files: bool = True,
    missing_ok: bool = False,
) -> list[dict]:
    """Load one split of an MSD-style datalist with every path-valued entry made absolute.

    Args:
        datalist: path to the datalist JSON file.
        split: the split key to read, e.g. ``"training"``, ``"unlabeled"``, ``"validation"`` or ``"test"``.
            A split absent from the file gives ``[]`` (e.g. ``unlabeled`` in a fully labelled datalist).
        image_key: the record key that becomes ``"image"``: ``"image"`` (non-contrast T2WI + DWI, the student's
            input) or ``"ce"`` (contrast-enhanced phases, the teacher's input, moved to ``"image"``: the record's
            T2WI + DWI are then dropped).
        base_dir: folder the relative paths are relative to; defaults to the datalist's folder.
        check_files: raise :class:`FileNotFoundError` listing the first missing files if any resolved path does
            not exist (fail at start-up rather than in the middle of an epoch).
        missing_ok: return ``[]`` when the datalist file itself does not exist, instead of raising. For optional
            streams only, e.g. the unlabelled records of ``train.json`` when MONAI Label replaces the labelled
            records and the default ``datalist`` path does not exist.

    Returns:
        a list of new dicts, one per record: the keys of :data:`PATH_KEYS` that are present are absolute
        (normalised) paths or lists of paths, ``"image"`` is the (resolved) ``record[image_key]``, every other key
        (``"case"``, ...) is unchanged. A plain string record (MSD ``test`` style) becomes ``{"image": path}``.

    Raises:
        FileNotFoundError: the datalist (unless ``missing_ok``), or (with ``check_files``) a file it names, does not
            exist.
        ValueError: the split is not a list, or a record lacks ``image_key`` or has both ``ce`` and ``image_ce``.
        TypeError: a record is not a dict or a path string, or a path-valued entry is not ``str``/list of ``str``.
    """
    datalist = os.fspath(datalist)
    if not os.path.isfile(datalist):
        if missing_ok:
            return []
        raise FileNotFoundError(f"datalist file not found: {datalist}")
    with open(datalist) as f:
        content = json.load(f)
    if not isinstance(content, dict):
        raise TypeError(f"{datalist}: expected a JSON object with split keys {SPLITS}, got {type(content).__name__}.")
    if split not in content:
        return []
    records = content[split]
    if not isinstance(records, list):
        raise ValueError(f"{datalist}: split '{split}' must be a list of records, got {type(records).__name__}.")
    base = os.fspath(base_dir) if base_dir is not None else os.path.dirname(os.path.abspath(datalist))

    items: list[dict] = []
    warned = False
    for i, record in enumerate(records):
        where = f"{datalist} [{split}][{i}]"
        if isinstance(record, str):
            record = {"image": record}
        if not isinstance(record, dict):
            raise TypeError(f"{where}: a record must be a dict or a path string, got {type(record).__name__}.")
        item = dict(record)
        if "image_ce" in item:
            if "ce" in item:
                raise ValueError(f"{where}: record has both 'ce' and its old name 'image_ce'.")
            if not warned:
                logger.warning(f"{datalist}: 'image_ce' is now named 'ce' (bundle 0.5.0); read as 'ce'.")
                warned = True
            item["ce"] = item.pop("image_ce")
        for key in PATH_KEYS:
            if key in item:
                item[key] = _resolve(base, key, item[key], where)
        if image_key not in item:
            raise ValueError(f"{where}: record has no '{image_key}' entry (keys: {sorted(item)}).")
        item["image"] = item.pop(image_key)
        items.append(item)

    if check_files:
        missing = [
            path
            for item in items
            for key in PATH_KEYS
            if key in item
            for path in ([item[key]] if isinstance(item[key], str) else item[key])
            if not os.path.exists(path)
        ]
        if missing:
            shown = "\n  ".join(sorted(set(missing))[:10])
            raise FileNotFoundError(
                f"{datalist} [{split}]: {len(set(missing))} file(s) named in the datalist do not exist, e.g.\n  {shown}"
            )
    return items
