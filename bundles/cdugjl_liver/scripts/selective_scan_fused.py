"""Fused CPU selective scan: the recurrence of :func:`scripts.selective_scan.selective_scan_ref` compiled by numba.

One compiled loop per (batch row, channel) runs the whole sequence with its ``N`` states in registers, so a token
costs its arithmetic and nothing else (the chunked scan runs about 26 eager tensor passes over the states per token
and direction). The backward runs the adjoint recurrence ``g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}`` in reverse,
recomputing the states in blocks of ``KEEP_EVERY`` tokens from the ones the forward kept. Only the core

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t,    y_t = sum_n C_t[n] * h_t[n]

is compiled, without any ``exp``: the decays ``exp(dt_t * A)`` are one vectorised PyTorch operation before it,
kept ([B, D, L, N] float32) for the backward, which derives the step size's and ``A``'s gradients from them. A
scalar ``exp`` per state and token inside the loop made it slower than the chunked scan. The step size
``softplus(delta + delta_bias)``, the ``D`` skip and the ``silu(z)`` gate stay PyTorch operations, differentiated
by autograd. Arithmetic is float32, sequential along the sequence.

numba is optional: :data:`AVAILABLE` is ``False`` without it, and ``scripts.mamba.Mamba`` then uses the chunked
scan. The first call in a process compiles the kernels (about 2 s each on one core). They are not cached on disk:
numba's cache records the importing module's name, and this package is imported under several names (``scripts`` by
the configs, ``<bundle>_scripts`` by the repository tools), so a cache written by one fails to load in the other.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .selective_scan import _skip_and_gate, _step_size

try:
    import numba
except ImportError:  # the chunked scan is the fallback
    numba = None

__all__ = ["AVAILABLE", "KEEP_EVERY", "selective_scan_fused"]

AVAILABLE = numba is not None
"""Whether numba imports, i.e. whether :func:`selective_scan_fused` can run."""
KEEP_EVERY = 16
"""The forward keeps the state entering every ``KEEP_EVERY``-th token; the backward recomputes the others."""

if AVAILABLE:

    def _forward_loop(u, dt, decay, b, c, y, kept, keep_every):  # pragma: no cover - compiled
        # u, dt, y: [R, D, L]; decay: [R, D, L, N]; b, c: [R, L, N]; kept: [R, D, ceil(L / keep_every), N]
        rows, channels, length = u.shape
        states = decay.shape[3]
        for i in numba.prange(rows * channels):
            r, d = i // channels, i % channels
            h = np.zeros(states, np.float32)
            for t in range(length):
                if t % keep_every == 0:
                    kept[r, d, t // keep_every, :] = h
                x = dt[r, d, t] * u[r, d, t]
                acc = np.float32(0.0)
                for n in range(states):
                    h[n] = decay[r, d, t, n] * h[n] + x * b[r, t, n]
                    acc += c[r, t, n] * h[n]
                y[r, d, t] = acc

    def _backward_loop(u, dt, a, decay, b, c, kept, gy, keep_every, blocks,
                         grad_u, grad_dt, grad_a, grad_b, grad_c):  # pragma: no cover - compiled
        # grad_u, grad_dt: [R, D, L]; grad_a: [R, D, N]; grad_b, grad_c: [R, blocks, L, N] (summed over blocks
        # afterwards: channel block p of row r writes only its own slice, so threads never share an element)
        rows, channels, length = u.shape
        states = a.shape[1]
        per_block = -(-channels // blocks)
        for job in numba.prange(rows * blocks):
            r, p = job // blocks, job % blocks
            buffer = np.empty((keep_every + 1, states), np.float32)  # h_{t0 - 1}, ..., h_{t1 - 1}
            for d in range(p * per_block, min(channels, (p + 1) * per_block)):
                g = np.zeros(states, np.float32)
                for k in range((length - 1) // keep_every, -1, -1):
                    t0 = k * keep_every
                    t1 = min(length, t0 + keep_every)
                    buffer[0, :] = kept[r, d, k, :]
                    for t in range(t0, t1):  # the block's states again, from the kept one
                        x = dt[r, d, t] * u[r, d, t]
                        for n in range(states):
                            buffer[t - t0 + 1, n] = decay[r, d, t, n] * buffer[t - t0, n] + x * b[r, t, n]
                    for t in range(t1 - 1, t0 - 1, -1):
                        step = dt[r, d, t]
                        x = step * u[r, d, t]
                        dy = gy[r, d, t]
                        g_step = np.float32(0.0)
                        g_x = np.float32(0.0)
                        for n in range(states):
                            g[n] += c[r, t, n] * dy  # adjoint of h_t
                            grad_c[r, p, t, n] += dy * buffer[t - t0 + 1, n]
                            g_log = g[n] * buffer[t - t0, n] * decay[r, d, t, n]  # d/d(dt * A) of the decay
                            g_step += g_log * a[d, n]
                            grad_a[r, d, n] += g_log * step
                            g_x += g[n] * b[r, t, n]
                            grad_b[r, p, t, n] += g[n] * x
                            g[n] *= decay[r, d, t, n]  # adjoint of h_{t-1}, before C_{t-1} gy_{t-1} joins it
                        grad_dt[r, d, t] = g_step + g_x * u[r, d, t]
                        grad_u[r, d, t] = g_x * step

    # each loop compiled twice (lazily, on first use): serial for one thread, so that numba starts no thread pool;
    # its OpenMP workers spin between calls and take a core from whatever else runs
    _SERIAL = (numba.njit(fastmath=True)(_forward_loop), numba.njit(fastmath=True)(_backward_loop))
    _PARALLEL = (numba.njit(parallel=True, fastmath=True)(_forward_loop),
                 numba.njit(parallel=True, fastmath=True)(_backward_loop))


def _threads() -> int:
    """numba threads for one call: PyTorch's intra-op thread count (``OMP_NUM_THREADS``), at most numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _kernels(threads: int) -> tuple:
    """The compiled ``(forward, backward)`` loops for ``threads`` threads (numba's pool set to that size)."""
    if threads == 1:
        return _SERIAL
    numba.set_num_threads(threads)
    return _PARALLEL


class _FusedCore(torch.autograd.Function):
    """``y_t = sum_n C_t[n] h_t[n]`` of the recurrence, on float32 CPU tensors, with the compiled backward."""

    @staticmethod
    def forward(ctx, u, dt, a, b_t, c_t):
        # u, dt: [R, D, L]; a: [D, N]; b_t, c_t: [R, L, N] (all float32, contiguous)
        rows, channels, length = u.shape
        decay = torch.exp(dt.unsqueeze(-1) * a.unsqueeze(1))  # [R, D, L, N], PyTorch's vectorised exp
        y = torch.empty_like(u)
        kept = torch.empty(rows, channels, math.ceil(length / KEEP_EVERY), a.shape[1])
        forward, _ = _kernels(_threads())
        forward(u.numpy(), dt.numpy(), decay.numpy(), b_t.numpy(), c_t.numpy(), y.numpy(), kept.numpy(),
                KEEP_EVERY)
        ctx.save_for_backward(u, dt, a, decay, b_t, c_t, kept)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        u, dt, a, decay, b_t, c_t, kept = ctx.saved_tensors
        rows, channels, length = u.shape
        threads = _threads()
        blocks = max(1, min(channels, -(-threads // rows)))  # enough (row, channel block) jobs for the threads
        grad_u, grad_dt = torch.empty_like(u), torch.empty_like(dt)
        grad_a = torch.zeros(rows, channels, a.shape[1])
        grad_b = torch.zeros(rows, blocks, length, a.shape[1])
        grad_c = torch.zeros_like(grad_b)
        _, backward = _kernels(threads)
        backward(u.numpy(), dt.numpy(), a.numpy(), decay.numpy(), b_t.numpy(), c_t.numpy(), kept.numpy(),
                 grad_y.float().contiguous().numpy(), KEEP_EVERY, blocks, grad_u.numpy(),
                 grad_dt.numpy(), grad_a.numpy(), grad_b.numpy(), grad_c.numpy())
        return grad_u, grad_dt, grad_a.sum(0), grad_b.sum(1), grad_c.sum(1)


def selective_scan_fused(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The selective scan of :func:`scripts.selective_scan.selective_scan_ref` with the fused CPU kernels.

    Args:
        u: input, [B, D, L] (CPU).
        delta: step size before bias/softplus, [B, D, L].
        A: state matrix, [D, N].
        B: input projection, [B, N, L].
        C: output projection, [B, N, L].
        D: skip weight, [D], or None.
        z: gate, [B, D, L], or None.
        delta_bias: bias added to ``delta``, [D], or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.

    Returns:
        y, [B, D, L], dtype of ``u``; differentiable in every tensor argument (not twice).

    Raises:
        RuntimeError: numba is not installed (:data:`AVAILABLE`).
    """
    if not AVAILABLE:
        raise RuntimeError("selective_scan_fused needs numba (pip install numba); use selective_scan_chunked")
    dtype = u.dtype
    u, delta, B, C, z = (None if t is None else t.as_subclass(torch.Tensor) for t in (u, delta, B, C, z))
    u = u.float()
    dt = _step_size(delta, delta_bias, delta_softplus)
    y = _FusedCore.apply(u.contiguous(), dt.contiguous(), A.float().contiguous(),
                         B.float().transpose(1, 2).contiguous(), C.float().transpose(1, 2).contiguous())
    return _skip_and_gate(y, u, D, z, dtype)
