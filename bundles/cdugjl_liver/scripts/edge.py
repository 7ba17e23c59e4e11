"""Edge-guided attention: a fixed (parameter-free) Sobel or Laplacian edge branch gated against the features.

After EaMtNet (Xiao et al., MICCAI 2023), which aggregates Sobel edge maps with CNN features, and the
edge-guidance modules of ET-Net / MEGANet: the edge operator is a non-trainable depthwise filter, a learned
projection turns its response into edge features, and a learned sigmoid gate mixes features and edge features.
Each module also predicts a one-channel edge map, which can be supervised with the tumour boundary.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv

__all__ = ["EdgeFilter", "EdgeGuidedAttention", "boundary_map"]


def _sobel_kernels(spatial_dims: int) -> torch.Tensor:
    """``[spatial_dims, 3, ..., 3]`` Sobel kernels: central difference along one axis, [1, 2, 1] along the others."""
    diff = torch.tensor([-1.0, 0.0, 1.0])
    smooth = torch.tensor([1.0, 2.0, 1.0])
    kernels = []
    for axis in range(spatial_dims):
        kernel = torch.ones([3] * spatial_dims)
        for d in range(spatial_dims):
            shape = [1] * spatial_dims
            shape[d] = 3
            kernel = kernel * (diff if d == axis else smooth).view(shape)
        kernels.append(kernel)
    return torch.stack(kernels)


def _laplacian_kernel(spatial_dims: int) -> torch.Tensor:
    """``[1, 3, ..., 3]`` discrete Laplacian with the face neighbours (``-2 * spatial_dims`` at the centre)."""
    kernel = torch.zeros([3] * spatial_dims)
    centre = [1] * spatial_dims
    kernel[tuple(centre)] = -2.0 * spatial_dims
    for d, step in itertools.product(range(spatial_dims), (0, 2)):
        idx = list(centre)
        idx[d] = step
        kernel[tuple(idx)] = 1.0
    return kernel[None]


class EdgeFilter(nn.Module):
    """Fixed depthwise edge operator: per channel, the Sobel gradient magnitude or the absolute Laplacian.

    The kernels are a non-persistent buffer: never trained, not in the state_dict.

    Args:
        spatial_dims: 2 or 3.
        channels: number of input channels (each filtered separately).
        kind: ``"sobel"`` or ``"laplacian"``.
    """

    def __init__(self, spatial_dims: int, channels: int, kind: str = "sobel") -> None:
        super().__init__()
        if kind == "sobel":
            kernels = _sobel_kernels(spatial_dims)
        elif kind == "laplacian":
            kernels = _laplacian_kernel(spatial_dims)
        else:
            raise ValueError(f"kind must be 'sobel' or 'laplacian', got {kind!r}.")
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.kind = kind
        self.num_kernels = kernels.shape[0]
        # [channels * num_kernels, 1, 3, ...]: each input channel convolved with every kernel (depthwise)
        weight = kernels[:, None].repeat(channels, *([1] * (spatial_dims + 1)))
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, *spatial]`` -> ``[B, C, *spatial]`` edge magnitude (replicate padding, same size)."""
        conv = F.conv2d if self.spatial_dims == 2 else F.conv3d
        x_pad = F.pad(x, [1] * (2 * self.spatial_dims), mode="replicate")
        response = conv(x_pad, self.weight.to(x.dtype), groups=self.channels)
        if self.kind == "laplacian":
            return response.abs()
        response = response.view(x.shape[0], self.channels, self.num_kernels, *x.shape[2:])
        return torch.sqrt((response**2).sum(2) + 1e-6)


class EdgeGuidedAttention(nn.Module):
    """Mix features with edge features through a learned gate.

    ``edge = ReLU(Norm(Conv1x1(EdgeFilter(x))))``, ``gate = sigmoid(Conv1x1([x, edge]))``,
    ``out = gate * x + (1 - gate) * edge``; the edge map ``Conv1x1(edge)`` (one channel, logits) is exposed for an
    optional boundary loss.

    Args:
        spatial_dims: 2 or 3.
        channels: number of feature channels.
        edge_kind: ``"sobel"`` or ``"laplacian"`` (see :class:`EdgeFilter`).
        norm: MONAI norm type of the edge projection.
    """

    def __init__(
        self, spatial_dims: int, channels: int, edge_kind: str = "sobel", norm: str | tuple = "batch"
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.edge_filter = EdgeFilter(spatial_dims, channels, edge_kind)
        self.edge_proj = Convolution(spatial_dims, channels, channels, kernel_size=1, norm=norm, act="relu")
        self.gate = conv(2 * channels, channels, kernel_size=1)
        self.edge_head = conv(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            x: ``[B, C, *spatial]`` features.

        Returns:
            ``(out [B, C, *spatial], gate [B, C, *spatial], edge_logits [B, 1, *spatial])``.
        """
        edge = self.edge_proj(self.edge_filter(x))
        gate = torch.sigmoid(self.gate(torch.cat([x, edge], dim=1)))
        return gate * x + (1 - gate) * edge, gate, self.edge_head(edge)


def boundary_map(label: torch.Tensor) -> torch.Tensor:
    """Inner boundary of a binary mask: ``mask - erode(mask)`` with the face-connected structuring element.

    Args:
        label: ``[B, 1, *spatial]`` 0/1 (or class-index, foreground > 0) mask, 2D or 3D.

    Returns:
        ``[B, 1, *spatial]`` float boundary map (1 on foreground pixels with a background face neighbour).
    """
    mask = (label > 0).float()
    spatial_dims = mask.ndim - 2
    kernel = _laplacian_kernel(spatial_dims).abs()[None].to(mask)  # centre and face neighbours
    kernel[(0, 0) + (1,) * spatial_dims] = 1.0
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    padded = F.pad(mask, [1] * (2 * spatial_dims), mode="replicate")
    eroded = (conv(padded, kernel) >= kernel.sum() - 0.5).float()
    return mask - eroded * mask
