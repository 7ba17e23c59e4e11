"""Mamba that runs everywhere: a ``mamba_ssm``-compatible Mamba block and an image token mixer built on it.

:class:`Mamba` has exactly the parameters, names, shapes and initialisation of
``mamba_ssm.modules.mamba_simple.Mamba`` (mamba-ssm 1.x/2.x), so checkpoints load in both directions. On a
CUDA input, with ``mamba_ssm`` importable, it calls the fused CUDA kernels; on a CPU, with numba importable, the
fused CPU scan of :mod:`scripts.selective_scan_fused`; otherwise (and under tracing, export and ``torch.compile``)
the float32 pure-PyTorch chunked selective scan of :mod:`scripts.selective_scan`. ``mamba_ssm`` is imported lazily,
on the first CUDA forward only, so CPU use (training, inference, TorchScript tracing, ONNX export) never touches it.
``torch.jit.trace`` and ``torch.onnx.export`` (both exporters) work in eval mode and give graphs specialised to the
traced token count (use a fixed ROI); ``torch.jit.script`` is not supported.

:class:`MambaLayer` mixes the voxels/pixels of a [B, C, *spatial] feature map with one :class:`Mamba` per scan
direction (forward, reverse, column-major and its reverse).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import selective_scan_fused as fused
from .selective_scan import selective_scan_chunked, selective_scan_ref

__all__ = ["Mamba", "MambaLayer", "SCAN_DIRECTIONS", "selective_scan_chunked", "selective_scan_ref"]

SCAN_DIRECTIONS = ("forward", "reverse", "transpose", "transpose_reverse")


@functools.lru_cache(maxsize=None)
def _mamba_ssm_ops() -> SimpleNamespace | None:
    """Import the ``mamba_ssm`` CUDA ops once; None when ``mamba_ssm`` (or its compiled kernel) is unusable.

    Called only for CUDA inputs. ``mamba_inner_fn`` (the fully fused block) needs ``causal_conv1d`` as well,
    exactly as in ``mamba_ssm``; without it the block uses ``selective_scan_fn`` after a PyTorch convolution.
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
    except Exception:  # ImportError, or a broken build raising anything else at import time
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        causal_conv1d_fn = None
    return SimpleNamespace(
        mamba_inner_fn=mamba_inner_fn if causal_conv1d_fn is not None else None, selective_scan_fn=selective_scan_fn
    )


class Mamba(nn.Module):
    """Mamba (S6) block with the ``mamba_ssm.modules.mamba_simple.Mamba`` state_dict and initialisation.

    Parameters (``d_inner = expand * d_model``, ``dt_rank = ceil(d_model / 16)`` when "auto"):
    ``in_proj.weight`` [2 d_inner, d_model], ``conv1d.weight`` [d_inner, 1, d_conv], ``conv1d.bias`` [d_inner],
    ``x_proj.weight`` [dt_rank + 2 d_state, d_inner], ``dt_proj.weight`` [d_inner, dt_rank],
    ``dt_proj.bias`` [d_inner], ``A_log`` [d_inner, d_state] (float32), ``D`` [d_inner] (float32),
    ``out_proj.weight`` [d_model, d_inner] (plus ``in_proj.bias``/``out_proj.bias`` when ``bias=True``).

    Backends, chosen per call: ``mamba_ssm.mamba_inner_fn`` (``use_fast_path`` and ``causal_conv1d`` present) or
    ``mamba_ssm.selective_scan_fn`` when the input is on CUDA and ``mamba_ssm`` imports;
    :func:`scripts.selective_scan_fused.selective_scan_fused` on a CPU when numba imports (not under tracing,
    export or ``torch.compile``); otherwise :func:`selective_scan_chunked` (float32, any device). Decoding with an
    inference cache is not supported.

    Args:
        d_model: token feature size.
        d_state: SSM state size ``N``.
        d_conv: width of the causal depthwise convolution.
        expand: ``d_inner / d_model``.
        dt_rank: rank of the step-size projection, or "auto".
        dt_min: smallest initial step size.
        dt_max: largest initial step size.
        dt_init: "random" (uniform) or "constant" initialisation of ``dt_proj.weight``.
        dt_scale: scale of the ``dt_proj.weight`` initialisation.
        dt_init_floor: lower clamp of the initial step size.
        conv_bias: bias in ``conv1d``.
        bias: bias in ``in_proj`` and ``out_proj``.
        use_fast_path: allow the fully fused CUDA kernel (``mamba_inner_fn``).
        layer_idx: kept for ``mamba_ssm`` compatibility (unused).
        device: parameter device.
        dtype: parameter dtype (``A_log`` and ``D`` stay float32, as in ``mamba_ssm``).
        chunk_size: tokens per chunk of the pure-PyTorch scan.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.chunk_size = chunk_size

        # same construction order as mamba_ssm, so that one seed gives the same weights in both
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            bias=conv_bias,
            **factory_kwargs,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}.")
        # step sizes log-uniform in [dt_min, dt_max]; the bias is their inverse softplus
        dt = torch.exp(
            torch.rand(self.d_inner, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation A = -(1, 2, ..., N) for every channel, kept in float32
        a = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Mix the tokens of ``hidden_states`` [B, L, d_model]; returns [B, L, d_model]."""
        seqlen = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # [B, 2 d_inner, L]
        A = -torch.exp(self.A_log.float())  # [d_inner, d_state]
        ops = _mamba_ssm_ops() if hidden_states.is_cuda else None
        if ops is not None and self.use_fast_path and ops.mamba_inner_fn is not None:
            return ops.mamba_inner_fn(
                xz,
                self.conv1d.weight,
                self.conv1d.bias,
                self.x_proj.weight,
                self.dt_proj.weight,
                self.out_proj.weight,
                self.out_proj.bias,
                A,
                None,
                None,
                self.D.float(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            )

        x, z = xz.chunk(2, dim=1)  # [B, d_inner, L] each
        x = F.silu(self.conv1d(x)[..., :seqlen])  # causal depthwise convolution
        x_dbl = self.x_proj(x.transpose(1, 2))  # [B, L, dt_rank + 2 d_state]
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # [B, d_inner, L]; the bias goes into the scan
        B, C = B.transpose(1, 2), C.transpose(1, 2)  # [B, d_state, L]
        scan_kwargs = {"D": self.D.float(), "z": z, "delta_bias": self.dt_proj.bias.float(), "delta_softplus": True}
        if ops is not None:
            y = ops.selective_scan_fn(x, dt.contiguous(), A, B.contiguous(), C.contiguous(), **scan_kwargs)
        elif _fused_cpu_scan(x):
            y = fused.selective_scan_fused(x, dt, A, B, C, **scan_kwargs)
        else:
            y = selective_scan_chunked(x, dt, A, B, C, chunk_size=self.chunk_size, **scan_kwargs)
        return self.out_proj(y.transpose(1, 2))


def _fused_cpu_scan(x: torch.Tensor) -> bool:
    """Whether the fused CPU scan runs for ``x``: a CPU tensor, numba present, and no tracing, export or compiling
    (the compiled kernels are opaque to them; the chunked scan has an exportable form)."""
    return (x.device.type == "cpu" and fused.AVAILABLE and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting())


class MambaLayer(nn.Module):
    """Token mixer for images: ``x + mean_k Mamba_k(scan_k(LayerNorm(x)))`` over the chosen scan directions.

    The [B, C, *spatial] map (2D or 3D) is layer-normalised over channels and flattened to tokens [B, S, C]
    (``S = prod(spatial)``). Each direction has its own :class:`Mamba` (``self.mamba[i]`` scans
    ``self.directions[i]``):

    - "forward": row-major order (last spatial axis fastest, like ``x.flatten(2)``);
    - "reverse": the forward order reversed;
    - "transpose": the last two spatial axes swapped before flattening (column-major within each slice);
    - "transpose_reverse": the transpose order reversed.

    Each output is put back into row-major order; the outputs are averaged (so the scale does not grow with
    the number of directions) and added to the input.

    Args:
        channels: feature channels ``C`` (the Mamba ``d_model``).
        directions: scan directions, a non-empty subset of ``SCAN_DIRECTIONS``.
        d_state: SSM state size.
        d_conv: width of the causal convolution.
        expand: Mamba expansion factor.
        chunk_size: tokens per chunk of the pure-PyTorch scan.
    """

    def __init__(
        self,
        channels: int,
        directions: Sequence[str] = ("forward", "reverse"),
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        directions = tuple(directions)
        unknown = [d for d in directions if d not in SCAN_DIRECTIONS]
        if not directions or unknown or len(set(directions)) != len(directions):
            raise ValueError(f"directions must be distinct values from {SCAN_DIRECTIONS}, got {directions}.")
        self.channels = channels
        self.directions = directions
        self.norm = nn.LayerNorm(channels)
        # a ModuleList, not a ModuleDict: "forward" cannot be a module name; mamba[i] scans directions[i]
        self.mamba = nn.ModuleList(
            Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand, chunk_size=chunk_size) for _ in directions
        )

    @staticmethod
    def _scan(tokens: torch.Tensor, spatial: Sequence[int], direction: str) -> torch.Tensor:
        """Reorder row-major ``tokens`` [B, S, C] into ``direction`` order (an involution: applying it twice
        restores the row-major order)."""
        if direction.startswith("transpose"):
            grid = tokens.reshape(tokens.shape[0], *spatial, tokens.shape[-1])
            tokens = grid.transpose(-2, -3).reshape(tokens.shape)
        if direction.endswith("reverse"):
            tokens = tokens.flip(1)
        return tokens

    @staticmethod
    def _unscan(tokens: torch.Tensor, spatial: Sequence[int], direction: str) -> torch.Tensor:
        """Inverse of :meth:`_scan`: ``direction``-ordered ``tokens`` [B, S, C] back to row-major order."""
        if direction.endswith("reverse"):
            tokens = tokens.flip(1)
        if direction.startswith("transpose"):
            swapped = list(spatial[:-2]) + [spatial[-1], spatial[-2]]
            grid = tokens.reshape(tokens.shape[0], *swapped, tokens.shape[-1])
            tokens = grid.transpose(-2, -3).reshape(tokens.shape)
        return tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix ``x`` [B, C, *spatial] (2 or 3 spatial axes); returns a tensor of the same shape."""
        if x.ndim not in (4, 5) or x.shape[1] != self.channels:
            raise ValueError(f"expected [B, {self.channels}, *spatial] with 2 or 3 spatial axes, got {tuple(x.shape)}.")
        spatial = x.shape[2:]
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # [B, S, C], row-major
        mixed = [
            self._unscan(mamba(self._scan(tokens, spatial, d)), spatial, d)
            for d, mamba in zip(self.directions, self.mamba)
        ]
        out = torch.stack(mixed).mean(0) if len(mixed) > 1 else mixed[0]
        return x + out.transpose(1, 2).reshape(x.shape)
