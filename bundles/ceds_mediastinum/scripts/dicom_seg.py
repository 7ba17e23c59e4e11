"""DICOM outputs for an input read from DICOM series: the mask as a DICOM Segmentation, the voxel map of doubt as a
DICOM Parametric Map, written with highdicom beside the NIfTI outputs.

The same file in both bundles of the collection (a test keeps the copies identical). Place :class:`SaveDicomSegd`
after the NIfTI ``SaveImaged`` of ``inference.json``'s postprocessing, where the mask and the map are back in the
input's geometry (``Invertd``). For an input read from NIfTI it does nothing. For a series folder (MONAI's
``PydicomReader`` stacks its slices in ``InstanceNumber`` order, voxel ``(i, j, k)`` being column ``i`` and row ``j``
of slice ``k``) it writes into the case's output folder

- ``<case>_dicom_seg.dcm``: a binary Segmentation whose frame ``k`` references slice ``k`` of the source series
  (same study, frame of reference and patient), with one segment labelled as the bundle's ``metadata.json``
  ``channel_def`` names class 1 and the bundle's name and version as the algorithm;
- ``<case>_dicom_<map>.dcm``: the map (float32, 0 to 1) as a Parametric Map referencing the same slices, which
  viewers show as an image.

For a multi-sequence input the first sequence's series is the source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .case_meta import case_name
from .dicom_series import check_series

__all__ = ["SaveDicomSegd", "series_frames"]

# patient and study attributes of type 2 (present, possibly empty) that the new objects copy from the source series;
# exports that leave them out are completed with empty values
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def series_frames(volume: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[1, X, Y, Z]`` or ``[X, Y, Z]`` (column, row, slice) as highdicom's ``[frames, rows, columns]``."""
    array = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume)
    return np.ascontiguousarray((array[0] if array.ndim == 4 else array).transpose(2, 1, 0))


class SaveDicomSegd(MapTransform):
    """Write the mask (and a voxel map) of an input read from DICOM series as DICOM objects (see the module docstring).

    Args:
        keys: the mask (``[1, *spatial]``, 0/1, in the input geometry).
        output_dir: the bundle's output folder (``<output_dir>/<case>/`` as ``SaveImaged(separate_folder=True)``).
        metadata_file: the bundle's ``configs/metadata.json`` (segment label, algorithm name and version).
        map_key: the voxel map to write as a Parametric Map (``None``: none).
        map_name: its name in the file name and the map's label (``"confidence"``, ``"uncertainty"``).
        modality_suffixes: the case-naming rule's suffixes (as ``CaseNameFormatter``).
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, metadata_file: str | os.PathLike,
                 map_key: str | None = None, map_name: str = "map", modality_suffixes: tuple[str, ...] = (),
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.meta = json.loads(Path(metadata_file).read_text())
        self.map_key, self.map_name = map_key, map_name
        self.modality_suffixes = tuple(modality_suffixes)

    def _device(self) -> dict[str, str]:
        """The equipment attributes highdicom requires: the bundle as the device that made the objects."""
        return {"manufacturer": "MONAI bundle", "manufacturer_model_name": self.meta["name"][:64],
                "software_versions": str(self.meta["version"]), "device_serial_number": "none"}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key].meta.get("filename_or_obj", "") if hasattr(d[key], "meta") else ""
            if not source or not Path(str(source)).is_dir():
                continue  # read from a file: the NIfTI outputs are all there is
            self.write(d[key], d.get(self.map_key) if self.map_key else None, Path(str(source)))
        return d

    def write(self, mask: torch.Tensor, doubt: torch.Tensor | None, folder: Path) -> list[Path]:
        """Write the Segmentation (and the Parametric Map) of ``mask`` (``doubt``) on the series in ``folder``.

        Returns:
            the files written.
        """
        import highdicom as hd
        from pydicom.sr.codedict import codes

        sources = check_series(folder)["headers"]
        for source in sources:  # type 2 attributes (present, may be empty) that highdicom copies from the source
            for keyword in TYPE_2_COPIED:
                if keyword not in source:
                    setattr(source, keyword, "")
        frames = series_frames(mask).astype(np.uint8)
        if frames.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
            raise ValueError(f"{folder}: mask of {frames.shape[0]} x {frames.shape[1:]} frames does not fit its "
                             f"{len(sources)} slices of {sources[0].Rows} x {sources[0].Columns}")
        name = case_name(str(folder), self.modality_suffixes)
        out = self.output_dir / name
        out.mkdir(parents=True, exist_ok=True)
        algorithm = hd.AlgorithmIdentificationSequence(name=self.meta["name"][:64], version=str(self.meta["version"]),
                                                       family=codes.DCM.ArtificialIntelligence)
        label = self.meta["network_data_format"]["outputs"]["pred"]["channel_def"]["1"]
        segment = hd.seg.SegmentDescription(
            segment_number=1, segment_label=label[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(),
            instance_number=1, series_description=f"{label} ({self.meta['name']})"[:64], **self._device())
        written = [out / f"{name}_dicom_seg.dcm"]
        seg.save_as(written[0])
        if doubt is not None:
            values = series_frames(doubt).astype(np.float32)
            mapping = hd.pm.RealWorldValueMapping(
                lut_label=self.map_name[:16], lut_explanation=f"{self.map_name} of {label}"[:64],
                unit=codes.UCUM.NoUnits, value_range=(0.0, 1.0), slope=1, intercept=0)
            pmap = hd.pm.ParametricMap(
                source_images=sources, pixel_array=values, series_instance_uid=hd.UID(), series_number=901,
                sop_instance_uid=hd.UID(), instance_number=1, contains_recognizable_visual_features=False,
                real_world_value_mappings=[mapping],
                voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
                series_description=f"{self.map_name} ({self.meta['name']})"[:64], **self._device())
            written.append(out / f"{name}_dicom_{self.map_name}.dcm")
            pmap.save_as(written[1])
        return written
