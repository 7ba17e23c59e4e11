"""Fused CPU selective scan: the recurrence of :func:`scripts.selective_scan.selective_scan_ref` compiled by numba.

One compiled loop per (batch row, channel) runs the whole sequence with its ``N`` states in registers, so a token
costs its arithmetic and nothing else (the chunked scan runs about 26 eager tensor passes over the states per token
and direction). The backward runs the adjoint recurrence ``g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}`` in reverse,
recomputing the states in blocks of ``KEEP_EVERY`` tokens from the ones the forward kept. Only the core

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t,    y_t = sum_n C_t[n] * h_t[n]

is compiled, without any ``exp``: the decays ``exp(dt_t * A)`` are a vectorised PyTorch operation on
:data:`BLOCK` tokens at a time, each block then run by the compiled loop with the states carried over (and computed
again, block by block in reverse, for the backward, which derives the step size's and ``A``'s gradients from
them). A scalar ``exp`` per state and token inside the loop made it slower than the chunked scan, and the decays of
the whole sequence at once ([B, D, L, N] float32, kept for the backward) cost more to allocate than to compute. The
step size ``softplus(delta + delta_bias)``, the ``D`` skip and the ``silu(z)`` gate stay PyTorch operations,
differentiated by autograd. Arithmetic is float32, sequential along the sequence.

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

__all__ = ["AVAILABLE", "BLOCK", "KEEP_EVERY", "selective_scan_fused"]

AVAILABLE = numba is not None
"""Whether numba imports, i.e. whether :func:`selective_scan_fused` can run."""
KEEP_EVERY = 16
"""The forward keeps the state entering every ``KEEP_EVERY``-th token; the backward recomputes the others."""
BLOCK = 256
"""Tokens whose decays ``exp(dt A)`` are computed at once (a multiple of :data:`KEEP_EVERY`): a few MB that stay in
cache between PyTorch's ``exp`` and the compiled loop, where decays for the whole sequence took longer to allocate
and page in than to compute."""

if AVAILABLE:

    def _forward_loop(u, dt, decay, b, c, y, kept, h, t0, keep_every):  # pragma: no cover - compiled
        # u, dt, y: [R, D, L]; b, c: [R, L, N]; kept: [R, D, ceil(L / keep_every), N]; decay: [R, D, BLOCK, N],
        # the decays of tokens t0, t0 + 1, ... (as many as are left); h: [R, D, N], the states entering t0 (updated)
        rows, channels, length = u.shape
        states = decay.shape[3]
        t1 = min(length, t0 + decay.shape[2])
        for i in numba.prange(rows * channels):
            r, d = i // channels, i % channels
            state = h[r, d]
            for t in range(t0, t1):
                if t % keep_every == 0:
                    kept[r, d, t // keep_every, :] = state
                x = dt[r, d, t] * u[r, d, t]
                dec, bt, ct = decay[r, d, t - t0], b[r, t], c[r, t]
                acc = np.float32(0.0)
                for n in range(states):
                    state[n] = dec[n] * state[n] + x * bt[n]
                    acc += ct[n] * state[n]
                y[r, d, t] = acc

    def _backward_loop(u, dt, a, decay, b, c, kept, gy, g, t0, keep_every, blocks,
                       grad_u, grad_dt, grad_a, grad_b, grad_c):  # pragma: no cover - compiled
        # tokens t0, t0 + 1, ... of decay (as in the forward), last to first; g: [R, D, N], the adjoint of the
        # states leaving the block (updated to the one entering it); grad_u, grad_dt: [R, D, L]; grad_a: [R, D, N]
        # (accumulated); grad_b, grad_c: [R, blocks, L, N] (summed over blocks afterwards: channel block p of row r
        # writes only its own slice, so threads never share an element)
        rows, channels, length = u.shape
        states = a.shape[1]
        t1 = min(length, t0 + decay.shape[2])
        per_block = -(-channels // blocks)
        for job in numba.prange(rows * blocks):
            r, p = job // blocks, job % blocks
            buffer = np.empty((keep_every + 1, states), np.float32)  # h_{s - 1}, ..., h_{e - 1}
            grad_a_d = np.empty(states, np.float32)
            for d in range(p * per_block, min(channels, (p + 1) * per_block)):
                adj, a_d = g[r, d], a[d]
                grad_a_d[:] = grad_a[r, d]
                for k in range((t1 - 1) // keep_every, t0 // keep_every - 1, -1):
                    s, e = k * keep_every, min(t1, (k + 1) * keep_every)
                    buffer[0, :] = kept[r, d, k, :]
                    for t in range(s, e):  # the sub-block's states again, from the kept one
                        x = dt[r, d, t] * u[r, d, t]
                        dec, bt, prev, cur = decay[r, d, t - t0], b[r, t], buffer[t - s], buffer[t - s + 1]
                        for n in range(states):
                            cur[n] = dec[n] * prev[n] + x * bt[n]
                    for t in range(e - 1, s - 1, -1):
                        step = dt[r, d, t]
                        x = step * u[r, d, t]
                        dy = gy[r, d, t]
                        dec, bt, ct = decay[r, d, t - t0], b[r, t], c[r, t]
                        prev, cur = buffer[t - s], buffer[t - s + 1]
                        gbt, gct = grad_b[r, p, t], grad_c[r, p, t]
                        g_step = np.float32(0.0)
                        g_x = np.float32(0.0)
                        for n in range(states):
                            gn = adj[n] + ct[n] * dy  # adjoint of h_t
                            gct[n] += dy * cur[n]
                            g_log = gn * prev[n] * dec[n]  # d/d(dt * A) of the decay
                            g_step += g_log * a_d[n]
                            grad_a_d[n] += g_log * step
                            g_x += gn * bt[n]
                            gbt[n] += gn * x
                            adj[n] = gn * dec[n]  # adjoint of h_{t-1}, before C_{t-1} gy_{t-1} joins it
                        grad_dt[r, d, t] = g_step + g_x * u[r, d, t]
                        grad_u[r, d, t] = g_x * step
                grad_a[r, d, :] = grad_a_d

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


def _decays(dt: torch.Tensor, a: torch.Tensor, t0: int, out: torch.Tensor) -> np.ndarray:
    """``exp(dt_t * A)`` of tokens ``t0, ..., t0 + BLOCK - 1`` (those that exist) into ``out`` [R, D, BLOCK, N]."""
    block = dt[:, :, t0:t0 + out.shape[2]]
    torch.mul(block.unsqueeze(-1), a.unsqueeze(1), out=out[:, :, :block.shape[2]]).exp_()
    return out.numpy()


class _FusedCore(torch.autograd.Function):
    """``y_t = sum_n C_t[n] h_t[n]`` of the recurrence, on float32 CPU tensors, with the compiled backward."""

    @staticmethod
    def forward(ctx, u, dt, a, b_t, c_t):
        # u, dt: [R, D, L]; a: [D, N]; b_t, c_t: [R, L, N] (all float32, contiguous)
        rows, channels, length = u.shape
        decay = torch.empty(rows, channels, min(BLOCK, length), a.shape[1])
        y = torch.empty_like(u)
        kept = torch.empty(rows, channels, math.ceil(length / KEEP_EVERY), a.shape[1])
        h = torch.zeros(rows, channels, a.shape[1])
        forward, _ = _kernels(_threads())
        for t0 in range(0, length, BLOCK):
            forward(u.numpy(), dt.numpy(), _decays(dt, a, t0, decay), b_t.numpy(), c_t.numpy(), y.numpy(),
                    kept.numpy(), h.numpy(), t0, KEEP_EVERY)
        ctx.save_for_backward(u, dt, a, b_t, c_t, kept)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        u, dt, a, b_t, c_t, kept = ctx.saved_tensors
        rows, channels, length = u.shape
        threads = _threads()
        blocks = max(1, min(channels, -(-threads // rows)))  # enough (row, channel block) jobs for the threads
        decay = torch.empty(rows, channels, min(BLOCK, length), a.shape[1])
        g = torch.zeros(rows, channels, a.shape[1])
        grad_y = grad_y.float().contiguous()
        grad_u, grad_dt = torch.empty_like(u), torch.empty_like(dt)
        grad_a = torch.zeros(rows, channels, a.shape[1])
        grad_b = torch.zeros(rows, blocks, length, a.shape[1])
        grad_c = torch.zeros_like(grad_b)
        _, backward = _kernels(threads)
        for t0 in reversed(range(0, length, BLOCK)):
            backward(u.numpy(), dt.numpy(), a.numpy(), _decays(dt, a, t0, decay), b_t.numpy(), c_t.numpy(),
                     kept.numpy(), grad_y.numpy(), g.numpy(), t0, KEEP_EVERY, blocks, grad_u.numpy(),
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
