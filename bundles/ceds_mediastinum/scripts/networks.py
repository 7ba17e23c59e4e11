"""The CEDS network: a V-Net encoder shared by a segmentation decoder and a confidence decoder with a CBAM head.

Built from MONAI's V-Net blocks (``monai.networks.nets.vnet``) with configurable widths, for 2D or 3D inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv, Pool
from monai.networks.nets.vnet import DownTransition, InputTransition, OutputTransition, UpTransition

__all__ = ["CBAMBlock", "CEDSNet", "ChannelAttention", "SpatialAttention", "VNetDecoder", "VNetEncoder"]


class ChannelAttention(nn.Module):
    """CBAM channel attention: a shared 1x1-convolution MLP on the average- and max-pooled features, then sigmoid.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        channels: number of input (and output) channels.
        reduction: channel reduction ratio of the hidden layer (at least one hidden channel is kept).
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 2) -> None:
        super().__init__()
        conv_type = Conv[Conv.CONV, spatial_dims]
        hidden = max(channels // reduction, 1)
        self.avg_pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.max_pool = Pool[Pool.ADAPTIVEMAX, spatial_dims](1)
        self.mlp = nn.Sequential(
            conv_type(channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
            conv_type(hidden, channels, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, *spatial]``; returns attention weights ``[B, C, 1, ...]`` in (0, 1)."""
        return torch.sigmoid(self.mlp(self.avg_pool(x)) + self.mlp(self.max_pool(x)))


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a convolution over the channel-wise mean and max maps, then sigmoid.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        kernel_size: odd kernel size of the convolution.
    """

    def __init__(self, spatial_dims: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = Conv[Conv.CONV, spatial_dims](2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, *spatial]``; returns attention weights ``[B, 1, *spatial]`` in (0, 1)."""
        pooled = torch.cat([torch.mean(x, dim=1, keepdim=True), torch.amax(x, dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class CBAMBlock(nn.Module):
    """Convolutional block attention module (Woo et al., ECCV 2018) with a residual connection.

    ``out = SA(CA(x) * x) * (CA(x) * x) + x``.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        channels: number of input (and output) channels.
        reduction: channel reduction ratio of the channel-attention MLP.
        kernel_size: kernel size of the spatial-attention convolution.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        self.channel_attention = ChannelAttention(spatial_dims, channels, reduction)
        self.spatial_attention = SpatialAttention(spatial_dims, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, *spatial]``; returns the same shape."""
        out = x * self.channel_attention(x)
        out = out * self.spatial_attention(out)
        return out + x


class VNetEncoder(nn.Module):
    """The V-Net contracting path: an input transition and four down transitions (each halves the size).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels; ``channels[0]`` must be a multiple of it.
        channels: the five feature widths, each twice the previous one (MONAI's ``DownTransition`` doubles).
        act: activation type and arguments.
        dropout_prob: dropout probability of the two deepest down transitions.
        dropout_dim: dimensions of the dropout (see ``monai.networks.nets.VNet``).
        bias: whether the convolutions have a bias term.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        act: tuple[str, dict] | str,
        dropout_prob: Optional[float],
        dropout_dim: int,
        bias: bool,
    ) -> None:
        super().__init__()
        c = channels
        self.in_tr = InputTransition(spatial_dims, in_channels, c[0], act, bias=bias)
        self.down_tr1 = DownTransition(spatial_dims, c[0], 1, act, dropout_dim=dropout_dim, bias=bias)
        self.down_tr2 = DownTransition(spatial_dims, c[1], 2, act, dropout_dim=dropout_dim, bias=bias)
        self.down_tr3 = DownTransition(spatial_dims, c[2], 3, act, dropout_prob, dropout_dim, bias)
        self.down_tr4 = DownTransition(spatial_dims, c[3], 2, act, dropout_prob, dropout_dim, bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: ``[B, in_channels, *spatial]``; returns the five feature maps, full resolution first."""
        f0 = self.in_tr(x)
        f1 = self.down_tr1(f0)
        f2 = self.down_tr2(f1)
        f3 = self.down_tr3(f2)
        f4 = self.down_tr4(f3)
        return [f0, f1, f2, f3, f4]


class VNetDecoder(nn.Module):
    """The V-Net expanding path: four up transitions with skip connections and an output transition.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        out_channels: number of output channels.
        channels: the five encoder widths (see :class:`VNetEncoder`).
        act: activation type and arguments.
        dropout_prob: dropout probabilities of the two deepest up transitions (input, skip).
        dropout_dim: dimensions of the dropout.
        bias: whether the output convolution has a bias term.
    """

    def __init__(
        self,
        spatial_dims: int,
        out_channels: int,
        channels: Sequence[int],
        act: tuple[str, dict] | str,
        dropout_prob: tuple[Optional[float], float],
        dropout_dim: int,
        bias: bool,
    ) -> None:
        super().__init__()
        c = channels
        self.up_tr4 = UpTransition(spatial_dims, c[4], c[4], 2, act, dropout_prob, dropout_dim)
        self.up_tr3 = UpTransition(spatial_dims, c[4], c[3], 2, act, dropout_prob, dropout_dim)
        self.up_tr2 = UpTransition(spatial_dims, c[3], c[2], 1, act, dropout_dim=dropout_dim)
        self.up_tr1 = UpTransition(spatial_dims, c[2], c[1], 1, act, dropout_dim=dropout_dim)
        self.out_tr = OutputTransition(spatial_dims, c[1], out_channels, act, bias=bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``features``: the encoder outputs, full resolution first; returns ``[B, out_channels, *spatial]``."""
        x = self.up_tr4(features[4], features[3])
        x = self.up_tr3(x, features[2])
        x = self.up_tr2(x, features[1])
        x = self.up_tr1(x, features[0])
        return self.out_tr(x)


class CEDSNet(nn.Module):
    """Dual-decoder V-Net of confidence-enhanced semi-supervised segmentation (CEDS, Ji et al., bioRxiv 2024).

    A V-Net encoder is shared by two decoders. Decoder 1 predicts the segmentation logits. Decoder 2 feeds the
    confidence head: its output, the segmentation logits and the entropy of their softmax are concatenated
    (``2 * out_channels + 1`` channels), passed through a residual CBAM block and an output transition to 2-class
    logits of "the segmentation is correct at this voxel" (class 1 = correct).

    ``forward`` returns ``(seg_logits, confidence_logits)`` in training mode (or when ``return_confidence`` is set)
    and only ``seg_logits`` in eval mode, so that ``verify_net_in_out``, sliding-window inference and TorchScript
    export see a single tensor; :meth:`forward_with_confidence` always returns both.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        out_channels: number of segmentation classes (background included).
        channels: the five encoder widths, each twice the previous one; the paper uses ``(16, 32, 64, 128, 256)``.
        act: activation type and arguments.
        dropout_prob_down: dropout probability of the two deepest down transitions.
        dropout_prob_up: dropout probabilities (input, skip) of the two deepest up transitions.
        dropout_dim: dimensions of the dropout (see ``monai.networks.nets.VNet``).
        bias: whether the convolutions followed by batch norm have a bias term.
        cbam_reduction: channel reduction ratio of the CBAM channel attention.
        cbam_kernel_size: kernel size of the CBAM spatial attention.
        detach_confidence_input: if True, the confidence branch sees detached encoder features and segmentation
            logits, so the confidence loss never updates the encoder or the segmentation decoder. This is what the
            authors' two-optimiser update amounts to (the encoder is stepped only on the segmentation losses).
        return_confidence: if True, ``forward`` returns both outputs in eval mode too.

    Raises:
        ValueError: ``spatial_dims`` is not 2 or 3, ``channels`` does not have five doubling widths, or
            ``channels[0]`` is not a multiple of ``in_channels``.
    """

    # the submodules of the confidence branch (decoder 2, CBAM, confidence output)
    CONFIDENCE_BRANCH = ("confidence_decoder", "cbam", "confidence_out")

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        act: tuple[str, dict] | str = ("elu", {"inplace": True}),
        dropout_prob_down: Optional[float] = 0.5,
        dropout_prob_up: tuple[Optional[float], float] = (0.5, 0.5),
        dropout_dim: int = 3,
        bias: bool = False,
        cbam_reduction: int = 2,
        cbam_kernel_size: int = 3,
        detach_confidence_input: bool = True,
        return_confidence: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        channels = tuple(int(c) for c in channels)
        if len(channels) != 5 or any(b != 2 * a for a, b in zip(channels[:-1], channels[1:])):
            raise ValueError(f"channels must be five widths, each twice the previous one, got {channels}.")
        if channels[0] % in_channels != 0:
            raise ValueError(f"channels[0]={channels[0]} must be a multiple of in_channels={in_channels}.")
        dropout_prob_up = (dropout_prob_up[0], float(dropout_prob_up[1]))
        head_channels = 2 * out_channels + 1
        self.encoder = VNetEncoder(spatial_dims, in_channels, channels, act, dropout_prob_down, dropout_dim, bias)
        self.seg_decoder = VNetDecoder(spatial_dims, out_channels, channels, act, dropout_prob_up, dropout_dim, bias)
        self.confidence_decoder = VNetDecoder(
            spatial_dims, out_channels, channels, act, dropout_prob_up, dropout_dim, bias
        )
        self.cbam = CBAMBlock(spatial_dims, head_channels, cbam_reduction, cbam_kernel_size)
        self.confidence_out = OutputTransition(spatial_dims, head_channels, 2, act, bias=bias)
        self.detach_confidence_input = detach_confidence_input
        self.return_confidence = return_confidence

    def confidence_branch(self) -> tuple[nn.Module, ...]:
        """The modules of the confidence branch (:attr:`CONFIDENCE_BRANCH`): decoder 2, the CBAM block and the
        confidence output."""
        return tuple(getattr(self, name) for name in self.CONFIDENCE_BRANCH)

    def confidence_parameters(self) -> list[nn.Parameter]:
        """Parameters of the confidence branch (decoder 2, CBAM, confidence output), optimised on their own."""
        return [p for m in self.confidence_branch() for p in m.parameters()]

    def reset_confidence_branch(self) -> None:
        """Re-initialise the confidence branch (decoder 2, CBAM, confidence output): weights, biases and batch-norm
        statistics as at construction, so that a re-training starts from the current segmentation alone."""
        for branch in self.confidence_branch():
            for module in branch.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def segmentation_parameters(self) -> list[nn.Parameter]:
        """Parameters of the encoder and the segmentation decoder."""
        return [p for m in (self.encoder, self.seg_decoder) for p in m.parameters()]

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_channels, *spatial]``; returns segmentation logits ``[B, out_channels, *spatial]``."""
        return self.seg_decoder(self.encoder(x))

    def forward_with_confidence(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``[B, in_channels, *spatial]``; returns segmentation logits ``[B, out_channels, *spatial]`` and
        confidence logits ``[B, 2, *spatial]`` (channel 1: the segmentation is correct)."""
        features = self.encoder(x)
        seg = self.seg_decoder(features)
        seg_in = seg
        if self.detach_confidence_input:
            features = [f.detach() for f in features]
            seg_in = seg.detach()
        prob = torch.softmax(seg_in, dim=1)
        entropy = -torch.sum(prob * torch.log(prob + 1e-6), dim=1, keepdim=True)
        head_in = torch.cat([self.confidence_decoder(features), seg_in, entropy], dim=1)
        return seg, self.confidence_out(self.cbam(head_in))

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Both outputs in training mode or with ``return_confidence``, else the segmentation logits only."""
        if self.training or self.return_confidence:
            return self.forward_with_confidence(x)
        return self.segment(x)
