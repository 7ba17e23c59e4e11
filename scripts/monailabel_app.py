"""The MONAI Label app that ``scripts/monailabel_server.py`` serves: the ``monaibundle`` sample app, whose DICOMweb
datastore also hands a bundle with a multi-sequence input (the liver bundle: T2WI and DWI) one image per study.

``build_app`` copies this file to ``<app>/main.py`` and the sample's own ``main.py`` to ``<app>/sample_main.py``;
it runs inside the MONAI Label venv. MONAI Label 0.8.5's ``DICOMWebDatastore`` makes every series an image of its
own (``list_images``: one id per ``SeriesInstanceUID``; ``get_image_uri``: that series as one NIfTI file), and it
lists the series of one modality (``MONAI_LABEL_DICOMWEB_SEARCH_FILTER``, CT by default). A bundle whose input has
several channels, each a sequence (``metadata.json``: ``network_data_format.inputs.image`` with ``num_channels``
> 1, ``channel_def`` and ``channel_file_suffixes``), needs the series of one study stacked instead.
:class:`MultiSequenceDICOMWebDatastore` does that:

- It lists the series of the modalities of the served bundles' inputs (the search filter's other keys kept). For
  a multi-sequence input, the series of one study whose ``SeriesDescription`` names each sequence once (the
  ``channel_def`` name or the file suffix without its ``_``, case-insensitive: ``T2WI`` / ``t2w``, ``DWI`` /
  ``dwi``) form one image, whose id is the first sequence's ``SeriesInstanceUID``; the other sequences' series
  are not listed, and series of that modality outside a complete group are left out (logged).
- ``get_image_uri`` of such an image downloads every sequence's series, converts each with MONAI Label's
  ``dicom_to_nifti`` and writes them as the last axis of one NIfTI ``[x, y, z, sequences]`` (the layout of the
  local studies, which the bundle's ``EnsureChannelFirstd`` reads). Sequences of different geometry are refused
  with an error naming both series.
- Labels keep working unchanged: a label is saved as a DICOM SEG on the first sequence's series (the image id),
  and a SEG referencing that series is the image's label in the training datalist.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import sample_main
from cachetools import TTLCache, cached
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import dicom_to_nifti
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.app import MONAILabelApp
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

def bundle_inputs(bundle_dirs: list[Path]) -> list[dict[str, Any]]:
    """The input of each served bundle: ``{"modality", "sequences"}``, ``sequences`` holding, per channel, the
    lower-case names a ``SeriesDescription`` may carry (empty for a single-channel input)."""
    inputs = []
    for folder in bundle_dirs:
        meta = json.loads((Path(folder) / "configs" / "metadata.json").read_text())
        image = meta["network_data_format"]["inputs"]["image"]
        sequences = []
        if int(image.get("num_channels", 1)) > 1:
            names = image["channel_def"]
            suffixes = image.get("channel_file_suffixes", [""] * len(names))
            sequences = [sorted({names[str(c)].lower(), suffixes[c].lstrip("_").lower()} - {""})
                         for c in range(len(names))]
        inputs.append({"modality": str(image.get("modality", "CT")).upper(), "sequences": sequences})
    return inputs


def match_sequences(descriptions: dict[str, str], sequences: list[list[str]]) -> list[str] | None:
    """The series of one study in channel order, or ``None`` unless each sequence is named by exactly one series.

    Args:
        descriptions: ``{SeriesInstanceUID: SeriesDescription}`` of the study's series of the input's modality.
        sequences: per channel, the names a description may contain (:func:`bundle_inputs`).
    """
    chosen = []
    for names in sequences:
        found = [uid for uid, text in descriptions.items() if any(n in text.lower() for n in names)]
        if len(found) != 1:
            return None
        chosen.append(found[0])
    return chosen if len(set(chosen)) == len(chosen) else None


class MultiSequenceDICOMWebDatastore(DICOMWebDatastore):
    """A ``DICOMWebDatastore`` that lists the served bundles' modalities and stacks multi-sequence studies
    (see the module docstring).

    Made from the ``DICOMWebDatastore`` that MONAI Label builds from its settings (client, session, cache, search
    filter) by :meth:`extend`, so that those settings keep their meaning.
    """

    _inputs: list[dict[str, Any]]

    @classmethod
    def extend(cls, datastore: DICOMWebDatastore, inputs: list[dict[str, Any]]) -> MultiSequenceDICOMWebDatastore:
        """Make ``datastore`` (a plain ``DICOMWebDatastore``) one of this class, in place: its client, cache and
        file watcher are kept (building a second datastore on the same cache would start a second watcher).

        Args:
            datastore: the datastore MONAI Label built.
            inputs: the served bundles' inputs (:func:`bundle_inputs`).
        """
        if type(datastore) is not DICOMWebDatastore:
            raise TypeError(f"expected MONAI Label's DICOMWebDatastore, got {type(datastore).__name__}")
        datastore.__class__ = cls
        datastore._inputs = inputs
        return datastore

    def _search(self, modality: str) -> list[Dataset]:
        filters = {**self._search_filter, "Modality": modality}
        return [Dataset.from_json(ds) for ds in self._client.search_for_series(search_filters=filters)]

    @cached(cache=TTLCache(maxsize=16, ttl=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY))
    def groups(self) -> dict[str, list[str]]:
        """``{image id: [SeriesInstanceUID per sequence]}`` of the multi-sequence studies in the PACS."""
        groups = {}
        for entry in (i for i in self._inputs if i["sequences"]):
            studies: dict[str, dict[str, str]] = {}
            for ds in self._search(entry["modality"]):
                studies.setdefault(str(ds.StudyInstanceUID), {})[str(ds.SeriesInstanceUID)] = str(
                    ds.get("SeriesDescription", ""))
            for study, descriptions in studies.items():
                chosen = match_sequences(descriptions, entry["sequences"])
                if chosen is None:
                    logger.warning(f"Study {study}: its {entry['modality']} series {descriptions} do not name each "
                                   f"sequence {entry['sequences']} once; left out")
                    continue
                groups[chosen[0]] = chosen
        return groups

    @cached(cache=TTLCache(maxsize=16, ttl=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY))
    def list_images(self) -> list[str]:
        single = {i["modality"] for i in self._inputs if not i["sequences"]}
        series = [str(ds.SeriesInstanceUID) for m in sorted(single) for ds in self._search(m)]
        return series + list(self.groups())

    def get_image_uri(self, image_id: str) -> str:
        group = self.groups().get(image_id)
        if group is None:
            return super().get_image_uri(image_id)
        stacked = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
        if os.path.exists(stacked):
            return stacked
        arrays, affines = [], []
        for uid in group:
            series_dir = os.path.realpath(os.path.join(self._datastore.image_path(), uid))
            if not os.path.exists(series_dir) or not os.listdir(series_dir):
                dicom_web_download_series(None, uid, series_dir, self._client, self._fetch_by_frame)
            converted = dicom_to_nifti(series_dir)  # a temporary file
            volume = nib.load(converted)
            arrays.append(np.asarray(volume.dataobj, dtype=np.float32))
            affines.append(volume.affine)
            os.unlink(converted)
        for uid, array, affine in zip(group[1:], arrays[1:], affines[1:]):
            if array.shape != arrays[0].shape or not np.allclose(affine, affines[0], atol=1e-3):
                raise ValueError(
                    f"series {uid} and {group[0]} of one study differ in geometry (shapes {array.shape} and "
                    f"{arrays[0].shape}, affines up to {np.abs(affine - affines[0]).max():.3g} mm apart); the "
                    "sequences of one input must share their slice grid")
        image = nib.Nifti1Image(np.stack(arrays, axis=-1), affines[0])
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, f"{image_id}.nii.gz")
            nib.save(image, path)
            LocalDatastore.add_image(self, image_id, path, self._dicom_info(image_id))
        return stacked


class BundleApp(sample_main.MyApp, MONAILabelApp):
    """The sample ``monaibundle`` app with :class:`MultiSequenceDICOMWebDatastore` for DICOMweb studies.

    (``MONAILabelApp`` is named as a base so that MONAI Label, which takes the class of ``main.py`` whose direct
    bases include it, finds this one.)"""

    def _init_dicomweb_datastore(self) -> MultiSequenceDICOMWebDatastore:
        bundles = [Path(b) for b in self.models.values()]
        return MultiSequenceDICOMWebDatastore.extend(super()._init_dicomweb_datastore(), bundle_inputs(bundles))
