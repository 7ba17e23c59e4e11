"""The liver quantification of an input read from DICOM series as a DICOM Structured Report (TID 1500).

:class:`SaveQuantificationSRd` turns the case's JSON report (``SaveQuantificationd``: ``<case>_quantification.json``)
into ``<case>_dicom_sr.dcm``, a Comprehensive 3D SR written with highdicom beside the DICOM Segmentation:

- one planar ROI group per slice where the network says tumour (tracking identifier ``slice <k>``): the network's
  tumour centre as a 3D point in the patient frame of the source series (DICOM LPS millimetres; the JSON report
  gives MONAI's RAS, so x and y change sign) with the network's tumour area (SCT 42798000 "Area", mm2);
- one group per lesion of the mask (``lesion <n>``): its volume (SCT 118565006 "Volume", mm3).

The evidential standard deviations stay in the JSON report. For an input read from NIfTI it does nothing; for a
multi-sequence input the first sequence's series is the source, as for the Segmentation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .case_meta import case_name
from .dicom_series import check_series

__all__ = ["SaveQuantificationSRd", "ras_to_lps"]


def ras_to_lps(point: list[float]) -> np.ndarray:
    """A point in MONAI's RAS world millimetres as DICOM patient (LPS) millimetres."""
    x, y, z = point
    return np.array([-x, -y, z], dtype=np.float64)


class SaveQuantificationSRd(MapTransform):
    """Write the quantification report of an input read from DICOM series as a DICOM SR (see the module docstring).

    Args:
        keys: the key whose meta data names the input (``filename_or_obj``: a series folder, or a list of them).
        output_dir: the bundle's output folder, holding ``<case>/<case>_<report_postfix>.json``.
        metadata_file: the bundle's ``configs/metadata.json`` (name and version of the observing device).
        report_postfix: postfix of the JSON report (``SaveQuantificationd``'s ``output_postfix``).
        modality_suffixes: the case-naming rule's suffixes.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, metadata_file: str | os.PathLike,
                 report_postfix: str = "quantification", modality_suffixes: tuple[str, ...] = (),
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.meta = json.loads(Path(metadata_file).read_text())
        self.report_postfix = report_postfix
        self.modality_suffixes = tuple(modality_suffixes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key].meta.get("filename_or_obj", "") if hasattr(d[key], "meta") else ""
            source = source[0] if isinstance(source, (list, tuple)) and source else source
            if source and Path(str(source)).is_dir():
                self.write(Path(str(source)))
        return d

    def write(self, folder: Path) -> Path:
        """Write ``<case>_dicom_sr.dcm`` from the case's JSON report, referencing the series in ``folder``.

        Returns:
            the file written.
        """
        import highdicom as hd
        from pydicom.sr.codedict import codes

        name = case_name(str(folder), self.modality_suffixes)
        report = json.loads((self.output_dir / name / f"{name}_{self.report_postfix}.json").read_text())
        sources = check_series(folder)["headers"]
        frame_of_reference = sources[0].FrameOfReferenceUID
        groups = []
        for entry in report["slices"]:
            network = entry.get("network")
            if not network or not network.get("tumour"):
                continue
            region = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                                         graphic_data=ras_to_lps(network["centre_world_mm"])[None],
                                         frame_of_reference_uid=frame_of_reference)
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"slice {entry['slice']}"),
                referenced_region=region, finding_type=codes.SCT.Neoplasm,
                measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=float(network["area_mm2"]),
                                                unit=codes.UCUM.SquareMillimeter)]))
        for lesion in report["lesions"]:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {lesion['lesion']}"),
                finding_type=codes.SCT.Neoplasm,
                measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=float(lesion["volume_mm3"]),
                                                unit=codes.UCUM.CubicMillimeter)]))
        device = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=hd.UID(), name=self.meta["name"][:64], manufacturer_name="MONAI bundle",
                model_name=f"{self.meta['name']} {self.meta['version']}"[:64]))
        content = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=device),
            procedure_reported=codes.LN.MRIUnspecifiedBodyRegion,
            imaging_measurements=groups or None)
        sr = hd.sr.Comprehensive3DSR(
            evidence=sources, content=content, series_instance_uid=hd.UID(), series_number=902,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MONAI bundle",
            series_description=f"quantification ({self.meta['name']})"[:64])
        target = self.output_dir / name / f"{name}_dicom_sr.dcm"
        sr.save_as(target)
        return target
