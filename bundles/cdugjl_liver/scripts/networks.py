"""MEAMT-Net: multi-task edge-aware Mamba network for liver tumour segmentation and quantification.

Layout (after xiaojiao929/CdUgJL ``models/meamt_net.py``, with the gaps of that code filled, see the model card):

- stem: 7x7 convolution at full resolution;
- three encoder stages (stride-2 convolution, residual unit, :class:`~scripts.edge.EdgeGuidedAttention`) at
  H/2, H/4, H/8, optionally followed by a Mamba layer at H/8;
- bottleneck at H/16: stride-2 convolution, residual unit, :class:`~scripts.mamba.MambaLayer`, residual unit;
- segmentation decoder: four (upsample x2, concatenate skip, two convolutions) blocks, then a 1x1 convolution to
  class logits and a Dirichlet head (``alpha = softplus(logits) + 1``);
- quantification decoder on the bottleneck: adaptive average pooling, MLP, NIG head giving (gamma, nu, alpha, beta)
  for the tumour centre along the two in-plane axes and its area, in units of the input field of view (see
  :func:`field_of_view_scale`; :func:`scripts.evidential.nig_rescale` converts them to mm / mm^2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from monai.networks.layers.factories import Conv, Pool

from .edge import EdgeGuidedAttention
from .evidential import DirichletHead, NIGHead
from .mamba import MambaLayer

__all__ = ["MEAMTNet", "field_of_view_scale"]


def field_of_view_scale(spacing: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Physical size of the quantification units of an input of ``spatial_shape`` pixels.

    The quantification head predicts the centre along each in-plane axis as a fraction of the field of view
    ``n_a * s_a`` and the area as a fraction of ``n_0 s_0 n_1 s_1``; these are the factors back to mm and mm^2.

    Args:
        spacing: ``[B, 2]`` (or ``[2]``) pixel spacing in mm along the two in-plane axes.
        spatial_shape: ``(n_0, n_1)``, the in-plane size in pixels of the network input.

    Returns:
        ``[B, 3]`` (or ``[3]``) factors ``(n_0 s_0, n_1 s_1, n_0 s_0 n_1 s_1)``.
    """
    extent = spacing * torch.as_tensor(spatial_shape[:2], dtype=spacing.dtype, device=spacing.device)
    return torch.cat([extent, extent.prod(-1, keepdim=True)], dim=-1)


class EncoderStage(nn.Module):
    """Stride-2 convolution, residual unit and edge-guided attention.

    Returns ``(features, gate, edge_logits)``; see :class:`~scripts.edge.EdgeGuidedAttention`.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, edge_kind: str, norm: str | tuple, dropout: float
    ) -> None:
        super().__init__()
        self.down = Convolution(spatial_dims, in_channels, out_channels, strides=2, act="relu", norm=norm)
        self.res = ResidualUnit(spatial_dims, out_channels, out_channels, act="relu", norm=norm, dropout=dropout)
        self.attention = EdgeGuidedAttention(spatial_dims, out_channels, edge_kind, norm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.attention(self.res(self.down(x)))


class Bottleneck(nn.Module):
    """Stride-2 convolution, residual unit, Mamba layer over the spatial tokens, residual unit (H/16)."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        mamba: nn.Module,
        norm: str | tuple,
        dropout: float,
    ) -> None:
        super().__init__()
        self.down = Convolution(spatial_dims, in_channels, out_channels, strides=2, act="relu", norm=norm)
        self.res1 = ResidualUnit(spatial_dims, out_channels, out_channels, act="relu", norm=norm, dropout=dropout)
        self.mamba = mamba
        self.res2 = ResidualUnit(spatial_dims, out_channels, out_channels, act="relu", norm=norm, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.mamba(self.res1(self.down(x))))


class DecoderBlock(nn.Module):
    """Upsample x2 (linear interpolation), concatenate the skip connection, two convolutions."""

    def __init__(
        self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int, norm: str | tuple
    ) -> None:
        super().__init__()
        self.up = UpSample(spatial_dims, in_channels, in_channels, scale_factor=2, mode="nontrainable")
        self.convs = nn.Sequential(
            Convolution(spatial_dims, in_channels + skip_channels, out_channels, act="relu", norm=norm),
            Convolution(spatial_dims, out_channels, out_channels, act="relu", norm=norm),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class QuantificationDecoder(nn.Module):
    """Adaptive average pooling to ``pool_size`` per axis, an MLP, and a NIG head for ``num_quantities`` values.

    Returns ``[B, num_quantities, 4]`` (gamma, nu, alpha, beta) in field-of-view units.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_quantities: int,
        hidden: Sequence[int] = (512, 128),
        pool_size: int = 4,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [Pool[Pool.ADAPTIVEAVG, spatial_dims](pool_size), nn.Flatten(1)]
        width = in_channels * pool_size**spatial_dims
        for i, h in enumerate(hidden):
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if i == 0 and dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, 4 * num_quantities))
        self.mlp = nn.Sequential(*layers)
        # centres and area are fractions of the field of view: a negative area or a centre outside the input
        # cannot be predicted
        self.head = NIGHead(num_quantities, mean_range=(0.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(x))


class MEAMTNet(nn.Module):
    """Multi-task edge-aware Mamba network (MEAMT-Net) with evidential segmentation and quantification heads.

    Args:
        spatial_dims: 2 (default, slices) or 3.
        in_channels: input channels (2 for T2WI + DWI; 3 for the contrast-enhanced teacher).
        out_channels: segmentation classes ``K`` (2: background, tumour).
        channels: five widths: stem (H), encoder stages (H/2, H/4, H/8) and bottleneck (H/16).
        num_quantities: regressed values (3: centre along axis 0, centre along axis 1, area).
        edge_kind: fixed edge operator of the attention modules, ``"sobel"`` or ``"laplacian"``.
        mamba_at_h8: also put a Mamba layer after the third encoder stage (H/8).
        mamba_directions: scan directions of the Mamba layers (see :class:`scripts.mamba.MambaLayer`).
        d_state: SSM state size.
        d_conv: causal convolution width of the Mamba layers.
        expand: inner expansion factor of the Mamba layers.
        norm: MONAI norm type of the convolutions.
        dropout: dropout of the residual units.
        quant_hidden: hidden widths of the quantification MLP.
        quant_pool: adaptive pooling size per axis before the quantification MLP.
        quant_dropout: dropout after the first quantification layer.
        evidence: evidence function of the Dirichlet head, ``"exp"`` or ``"softplus"``
            (:class:`scripts.evidential.DirichletHead`).

    The input size must be divisible by 16 along each spatial axis. In ``eval()`` mode :meth:`forward` returns one
    tensor, the Dirichlet concentrations ``alpha`` ``[B, K, *spatial]`` (probability ``alpha / S``, uncertainty
    ``K / S``); in ``train()`` mode it returns the dictionary of :meth:`forward_all`.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 2,
        out_channels: int = 2,
        channels: Sequence[int] = (64, 128, 256, 512, 1024),
        num_quantities: int = 3,
        edge_kind: str = "sobel",
        mamba_at_h8: bool = False,
        mamba_directions: Sequence[str] = ("forward", "reverse"),
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        norm: str | tuple = "batch",
        dropout: float = 0.0,
        quant_hidden: Sequence[int] = (512, 128),
        quant_pool: int = 4,
        quant_dropout: float = 0.3,
        evidence: str = "exp",
    ) -> None:
        super().__init__()
        if len(channels) != 5:
            raise ValueError(f"channels must give 5 widths (stem, 3 encoder stages, bottleneck), got {channels}.")
        self.spatial_dims = spatial_dims
        self.out_channels = out_channels

        def mamba(width: int) -> nn.Module:
            return MambaLayer(width, directions=tuple(mamba_directions), d_state=d_state, d_conv=d_conv, expand=expand)

        self.stem = Convolution(spatial_dims, in_channels, channels[0], kernel_size=7, act="relu", norm=norm)
        self.encoder = nn.ModuleList(
            [EncoderStage(spatial_dims, channels[i], channels[i + 1], edge_kind, norm, dropout) for i in range(3)]
        )
        self.mamba_h8 = mamba(channels[3]) if mamba_at_h8 else nn.Identity()
        self.bottleneck = Bottleneck(spatial_dims, channels[3], channels[4], mamba(channels[4]), norm, dropout)
        # decoder block i joins level i (skip, channels[i]) with the level below; widths as the authors' decoder
        self.decoder = nn.ModuleList(
            [
                DecoderBlock(
                    spatial_dims,
                    channels[4] if i == 3 else channels[i],
                    channels[i],
                    channels[max(i - 1, 0)],
                    norm,
                )
                for i in (3, 2, 1, 0)
            ]
        )
        self.seg_head = Conv[Conv.CONV, spatial_dims](channels[0], out_channels, kernel_size=1)
        self.dirichlet = DirichletHead(evidence)
        self.quant_decoder = QuantificationDecoder(
            spatial_dims, channels[4], num_quantities, quant_hidden, quant_pool, quant_dropout
        )

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Run every head and keep the intermediate maps (for losses and distillation).

        Args:
            x: ``[B, in_channels, *spatial]``, spatial sizes divisible by 16.

        Returns:
            a dict with
            ``"alpha"`` ``[B, K, *spatial]`` Dirichlet concentrations,
            ``"quant"`` ``[B, Q, 4]`` NIG parameters in field-of-view units,
            ``"features"`` the five encoder feature maps (stem, H/2, H/4, H/8 after the optional Mamba, bottleneck),
            ``"attention"`` the three edge-attention gates ``[B, C_i, *spatial_i]``,
            ``"edges"`` the three edge-map logits ``[B, 1, *spatial_i]`` (at H/2, H/4, H/8).
        """
        features = [self.stem(x)]
        gates, edges = [], []
        for stage in self.encoder:
            feat, gate, edge = stage(features[-1])
            features.append(feat)
            gates.append(gate)
            edges.append(edge)
        features[-1] = self.mamba_h8(features[-1])
        features.append(self.bottleneck(features[-1]))
        y = features[-1]
        for block, skip in zip(self.decoder, features[-2::-1]):
            y = block(y, skip)
        return {
            "alpha": self.dirichlet(self.seg_head(y)),
            "quant": self.quant_decoder(features[-1]),
            "features": features,
            "attention": gates,
            "edges": edges,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]:
        """Dirichlet concentrations ``[B, K, *spatial]`` in eval mode, the :meth:`forward_all` dict in train mode."""
        outputs = self.forward_all(x)
        return outputs if self.training else outputs["alpha"]
