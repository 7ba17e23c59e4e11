"""Slice-by-slice inference of the 2D MEAMT-Net over 3D volumes, with per-slice evidential quantification."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from .case_meta import voxel_spacing
from .evidential import nig_rescale
from .networks import field_of_view_scale

__all__ = ["ExtractQuantificationd", "SliceQuantInferer"]


class SliceQuantInferer(Inferer):
    """Run a 2D network with a ``forward_all`` method slice by slice over ``[B, C, H, W, D]`` volumes.

    Every slice is seen whole (the quantification head pools the whole field of view): batches of
    ``sw_batch_size`` slices are padded symmetrically to a multiple of ``divisible``, the Dirichlet
    concentrations are cropped back, and the per-slice NIG parameters are converted from field-of-view units to
    mm / mm^2 in the slice frame of the unpadded slice (centre measured from its first pixel centre along the two
    in-plane array axes, see :func:`scripts.networks.field_of_view_scale`), using the spacing of the input's affine.

    Args:
        spatial_dim: the slice axis among the three spatial axes (2: slices along the last axis).
        sw_batch_size: slices per forward pass.
        divisible: the network's size divisor (16 for MEAMT-Net).
        quant_key: the meta key of the returned tensor holding the per-slice NIG parameters.
        padding_mode: ``torch.nn.functional.pad`` mode of that padding. ``"replicate"`` (default) extends the
            slice's border (air around a body); zeros would put a frame of the mean intensity of a normalised
            image around it, which the network never sees in training: a contrast-enhanced teacher read the
            dark air inside such a frame as cyst (31 600 false-positive voxels over 16 validation volumes,
            against 2 900 with replicate padding; ``cdugjl_liver`` 0.5.2).

    Returns (``__call__``): a MetaTensor ``[B, K, H, W, D]`` of concentrations (meta copied from the input) whose
    ``meta[quant_key]`` is ``[B, D, Q, 4]`` (gamma, nu, alpha, beta; for Q = 3: centre along the first and second
    in-plane axis in mm and area in mm^2, beta in squared units), decollated with the batch when the input is
    batched. Use :class:`ExtractQuantificationd` to move it into the data dictionary after decollation.
    """

    def __init__(
        self,
        spatial_dim: int = 2,
        sw_batch_size: int = 8,
        divisible: int = 16,
        quant_key: str = "quant",
        padding_mode: str = "replicate",
    ):
        super().__init__()
        if spatial_dim not in (0, 1, 2):
            raise ValueError(f"spatial_dim must be 0, 1 or 2, got {spatial_dim}.")
        self.spatial_dim = spatial_dim
        self.sw_batch_size = sw_batch_size
        self.divisible = divisible
        self.quant_key = quant_key
        self.padding_mode = padding_mode

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> MetaTensor:
        """
        Args:
            inputs: ``[B, C, H, W, D]`` volumes (a MetaTensor for physical units).
            network: a MEAMT-Net (or a module wrapping one as ``.module``, e.g. DistributedDataParallel).
            args: unused positional arguments (Inferer interface).
            kwargs: unused keyword arguments (Inferer interface).
        """
        if inputs.ndim != 5:
            raise ValueError(f"expected [B, C, H, W, D] volumes, got shape {tuple(inputs.shape)}.")
        forward_all = getattr(network, "forward_all", None) or network.module.forward_all
        in_plane = [a for a in range(3) if a != self.spatial_dim]
        spacing = voxel_spacing(inputs)[:, in_plane]
        data = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        alphas, quants = [], []
        for b in range(data.shape[0]):
            slices = data[b].movedim(self.spatial_dim + 1, 0)  # [D, C, n0, n1]
            shape = slices.shape[2:]
            pad = [(-n) % self.divisible for n in shape]
            before = [p // 2 for p in pad]
            padded_shape = [n + p for n, p in zip(shape, pad)]
            scale = field_of_view_scale(spacing[b], padded_shape).to(torch.float32)
            offset = torch.stack([before[0] * spacing[b, 0], before[1] * spacing[b, 1], spacing.new_zeros(())])
            alpha_b, quant_b = [], []
            for start in range(0, slices.shape[0], self.sw_batch_size):
                x = slices[start : start + self.sw_batch_size]
                x = F.pad(x, [before[1], pad[1] - before[1], before[0], pad[0] - before[0]], mode=self.padding_mode)
                out = forward_all(x)
                alpha_b.append(out["alpha"][:, :, before[0] : before[0] + shape[0], before[1] : before[1] + shape[1]])
                nig = out["quant"].float()
                quant_b.append(nig_rescale(nig, scale.to(nig.device), offset.to(nig)))
            alphas.append(torch.cat(alpha_b).movedim(0, self.spatial_dim + 1))
            quants.append(torch.cat(quant_b))
        alpha = torch.stack(alphas)
        if isinstance(inputs, MetaTensor):
            output = MetaTensor(alpha, meta=dict(inputs.meta))
            output.is_batch = inputs.is_batch
        else:
            output = MetaTensor(alpha)
            output.is_batch = True
        output.meta[self.quant_key] = torch.stack(quants)
        return output


class ExtractQuantificationd(MapTransform):
    """Move the per-slice NIG parameters from ``data[key].meta[quant_key]`` to ``data[quant_key]`` (``[D, Q, 4]``).

    Run first in the postprocessing of :class:`SliceQuantInferer` outputs (after decollation).

    Args:
        keys: the prediction key(s) whose meta holds the parameters.
        quant_key: the meta key and the output key.
        allow_missing_keys: don't raise if a key, or its meta entry, is missing.
    """

    def __init__(self, keys: KeysCollection = "pred", quant_key: str = "quant", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.quant_key = quant_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = d[key].meta if isinstance(d[key], MetaTensor) else {}
            if self.quant_key in meta:
                quant = meta.pop(self.quant_key)
                # an unbatched input (``image[None]``, as MONAI Label passes it) leaves the batch dim in place
                d[self.quant_key] = quant[0] if quant.ndim == 4 else quant
            elif not self.allow_missing_keys:
                raise KeyError(f"'{key}' carries no '{self.quant_key}' in its meta; was it made by SliceQuantInferer?")
        return d
