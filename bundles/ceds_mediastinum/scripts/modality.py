"""Whether an image looks like the modality a bundle was trained on: a CT in Hounsfield units has air, an MR does not.

The same file in both bundles of the collection (a test keeps the copies identical). It imports nothing from the
bundle, so repository tools load it by path (``scripts/batch_infer.py`` applies the same rule to a streamed pass
over a file before any compute is spent on it).

- :func:`modality_problem`: the rule, on a volume's intensity summary.
- :class:`ModalityCheckd`: the rule as a transform of the bundle's inference preprocessing, right after loading.

The rule is deliberately coarse: it catches a volume of the other modality (an MR given to the CT bundle, a CT
given to the MRI bundle), not a poor scan.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["AIR_HU", "MR_MAX_AIR_FRACTION", "ModalityCheckd", "modality_problem"]

AIR_HU = -500.0
"""Below this a CT voxel in Hounsfield units is air or lung (about -1000 HU); an MR magnitude never gets there."""
MR_MAX_AIR_FRACTION = 0.05
"""An "MR" volume with at least this fraction of voxels below ``AIR_HU`` is taken for a CT."""


def modality_problem(modality: str, air_fraction: float, minimum: float, maximum: float) -> str | None:
    """Why a volume does not look like ``modality``, or ``None`` when it does.

    A CT in Hounsfield units has air (about -1000 HU: outside the body, lungs, bowel); an MR magnitude image is not
    negative, let alone at -1000.

    Args:
        modality: ``"CT"`` or ``"MR"`` (``metadata.json``); other modalities are not checked.
        air_fraction: the fraction of voxels below :data:`AIR_HU`.
        minimum, maximum: the intensity range.

    Returns:
        one sentence naming the problem and what the model expects, or ``None``.
    """
    if modality.upper() == "CT" and air_fraction == 0:
        return (f"does not look like a CT in Hounsfield units: no voxel below {AIR_HU:g} HU (air), intensities "
                f"{minimum:g} to {maximum:g}; an MR volume, or a CT rescaled out of HU? This model expects CT in HU")
    if modality.upper() == "MR" and air_fraction >= MR_MAX_AIR_FRACTION:
        return (f"looks like a CT in Hounsfield units, not an MR: {100 * air_fraction:.0f} % of the voxels are below "
                f"{AIR_HU:g} (minimum {minimum:g}); this model expects MR")
    return None


class ModalityCheckd(MapTransform):
    """Refuse an input that does not look like ``modality`` (:func:`modality_problem`), channel by channel.

    Place it right after loading, before any intensity scaling. The error names the file and, for a multi-channel
    input, the channel (MONAI keeps only the first file name of channels loaded from one file each).

    Args:
        keys: the images to check (``[C, *spatial]``, intensities as stored).
        modality: ``"CT"`` or ``"MR"``.
        channel_names: the input channels' names for the message (for example ``["T2WI", "DWI"]``).
        allow_missing_keys: skip absent keys.

    Raises:
        ValueError: ``"<file>[, channel <c> (<name>)]: <problem>"`` for the first channel that does not look like
            ``modality``.
    """

    def __init__(self, keys: KeysCollection, modality: str, channel_names: Sequence[str] = (),
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality = modality
        self.channel_names = tuple(channel_names)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            name = getattr(d[key], "meta", {}).get("filename_or_obj", key)
            for c, channel in enumerate(image.reshape(image.shape[0], -1)):
                channel = channel.float()
                problem = modality_problem(self.modality, float((channel < AIR_HU).float().mean()),
                                           float(channel.min()), float(channel.max()))
                if problem is None:
                    continue
                if image.shape[0] > 1:
                    label = f" ({self.channel_names[c]})" if c < len(self.channel_names) else ""
                    name = f"{name}, channel {c}{label}"
                raise ValueError(f"{name}: {problem}")
        return d
