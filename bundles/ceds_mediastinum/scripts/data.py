"""Reading one split of an MSD-style datalist (``training``, ``unlabeled``, ``validation``, ``test``)."""

from __future__ import annotations

import json
import logging
import os

from monai.data import load_decathlon_datalist

__all__ = ["load_split"]

logger = logging.getLogger(__name__)


def load_split(datalist: str | os.PathLike, split: str, optional: bool = False) -> list[dict]:
    """Records of ``split`` with ``image`` and ``label`` made absolute (``monai.data.load_decathlon_datalist``).

    Args:
        datalist: path of the datalist JSON file; relative paths inside are relative to its folder.
        split: ``"training"``, ``"unlabeled"``, ``"validation"`` or ``"test"``.
        optional: return ``[]`` (with a warning) instead of raising when the file or the split is missing; used
            for the unlabelled stream, so that a client that overrides only the labelled data (MONAI Label)
            trains supervised.

    Returns:
        a list of record dicts (other keys such as ``case`` are kept as they are).

    Raises:
        FileNotFoundError: the file is missing and ``optional`` is False.
        ValueError: the split is missing and ``optional`` is False.
    """
    datalist = os.fspath(datalist)
    if optional:
        if not os.path.isfile(datalist):
            logger.warning(f"datalist {datalist} not found: no '{split}' records.")
            return []
        with open(datalist) as f:
            if not json.load(f).get(split):
                return []
    return load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=split)
