"""Pure-PyTorch selective scan (the S6 recurrence of Mamba) in float32, with a sequential reference.

Both functions take the tensors of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``::

    u, delta: [B, D, L]   input and (pre-softplus) step size per channel and token
    A:        [D, N]      state matrix (negative real, ``-exp(A_log)`` in Mamba)
    B, C:     [B, N, L]   input-dependent input and output projections
    D:        [D]         skip connection (optional)
    z:        [B, D, L]   gate, the output is multiplied by ``silu(z)`` (optional)
    delta_bias: [D]       added to ``delta`` before the (optional) softplus

and compute, with ``dt = softplus(delta + delta_bias)`` and a zero initial state ``h`` of shape [B, D, N]::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t = sum_n C_t[n] * h_t[n] + D * u_t,   then   y_t = y_t * silu(z_t)

The result has the shape and dtype of ``u``; all arithmetic is float32 whatever the input dtype.
Neither function imports ``mamba_ssm``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "selective_scan_chunked"]


def _step_size(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    """Return the float32 discretisation step ``softplus(delta + delta_bias)`` (softplus optional), [B, D, L]."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Add the ``D * u`` skip, apply the ``silu(z)`` gate (both float32) and cast to ``dtype``; all [B, D, L]."""
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def selective_scan_ref(
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
    """Sequential reference recurrence, one token per step (slow; for tests and as the definition).

    Args:
        u: input, [B, D, L].
        delta: step size before bias/softplus, [B, D, L].
        A: state matrix, [D, N].
        B: input projection, [B, N, L].
        C: output projection, [B, N, L].
        D: skip weight, [D], or None.
        z: gate, [B, D, L], or None.
        delta_bias: bias added to ``delta``, [D], or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.

    Returns:
        y, [B, D, L], dtype of ``u``.
    """
    dtype = u.dtype
    u = u.float()
    dt = _step_size(delta, delta_bias, delta_softplus)
    decay = torch.exp(dt.unsqueeze(-1) * A.float()[:, None, :])  # [B, D, L, N]
    drive = (dt * u).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(1)  # [B, D, L, N]
    readout = C.float().transpose(1, 2).unsqueeze(1)  # [B, 1, L, N]
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # [B, D, N]
    ys = []
    # unbind (not indexing) per step keeps the backward linear in L: one stack instead of L scatters
    for decay_t, drive_t, readout_t in zip(decay.unbind(2), drive.unbind(2), readout.unbind(2)):
        state = decay_t * state + drive_t
        ys.append((state * readout_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)
    return _skip_and_gate(y, u, D, z, dtype)


def _to_chunks(x: torch.Tensor, n_chunks: int, chunk: int) -> torch.Tensor:
    """[B, K, L] -> time-major chunks [T, n_chunks, B, K] (zero-padded to ``n_chunks * T`` tokens), contiguous."""
    pad = n_chunks * chunk - x.shape[-1]
    x = x.permute(2, 0, 1)  # [L, B, K]
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.reshape(n_chunks, chunk, x.shape[1], x.shape[2]).transpose(0, 1).contiguous()


def _from_chunks(x: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`_to_chunks`: [T, n_chunks, B, K] -> [B, K, length]."""
    chunk, n_chunks, batch, k = x.shape
    return x.transpose(0, 1).reshape(n_chunks * chunk, batch, k)[:length].permute(1, 2, 0)


def _carry(local: list[torch.Tensor], chunk_decay: list[torch.Tensor], reverse: bool = False) -> torch.Tensor:
    """Carry per-chunk quantities across chunks: ``H_c = local_c + chunk_decay_c * H_{c-1}``.

    Args:
        local: per chunk, the value accumulated within the chunk from zero, each [B, N, D].
        chunk_decay: per chunk, the product of its token decays, each [B, N, D].
        reverse: run from the last chunk to the first (the adjoint in the backward pass).

    Returns:
        [n_chunks, B, N, D]: the value entering each chunk (zero for the first one in scan order).
    """
    order = range(len(local) - 1, -1, -1) if reverse else range(len(local))
    entering = {}
    carried = torch.zeros_like(local[0])
    for c in order:
        entering[c] = carried
        carried = torch.addcmul(local[c], chunk_decay[c], carried)
    return torch.stack([entering[c] for c in range(len(local))])


def _scan_forward(
    dt_c: torch.Tensor, x_c: torch.Tensor, b_c: torch.Tensor, c_c: torch.Tensor, a_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked recurrence on time-major chunks (all float32; states laid out [nc, B, N, D]).

    Args:
        dt_c: step sizes, [T, nc, B, D].
        x_c: step size times input, [T, nc, B, D].
        b_c: input projection, [T, nc, B, N].
        c_c: output projection, [T, nc, B, N].
        a_t: state matrix transposed, [N, D].

    Returns:
        y [T, nc, B, D] and the state entering every chunk, [nc, B, N, D].
    """
    # One token (of every chunk) at a time: each operation touches a cache-sized [nc, B, N, D] slice, and the
    # per-token decays and inputs are recomputed rather than kept: an [L, B, N, D] tensor is never formed
    # (on CPU such tensors are memory-bound and several times slower than the arithmetic).
    dts = [t.unsqueeze(-2) for t in dt_c.unbind(0)]  # [nc, B, 1, D]
    xs = [t.unsqueeze(-2) for t in x_c.unbind(0)]
    bs = [t.unsqueeze(-1) for t in b_c.unbind(0)]  # [nc, B, N, 1]
    state = torch.zeros(dt_c.shape[1], dt_c.shape[2], a_t.shape[0], dt_c.shape[3], dtype=a_t.dtype, device=a_t.device)
    if dt_c.shape[1] > 1:
        for dt_t, x_t, b_t in zip(dts, xs, bs):  # end state of every chunk started from zero
            state = torch.addcmul(b_t * x_t, torch.exp(dt_t * a_t), state)
        chunk_decay = torch.exp(dt_c.sum(0).unsqueeze(-2) * a_t)
        state = _carry(list(state.unbind(0)), list(chunk_decay.unbind(0)))
    starts = state
    ys = []
    for dt_t, x_t, b_t, c_t in zip(dts, xs, bs, c_c.unbind(0)):  # each chunk from its true start state
        state = torch.addcmul(b_t * x_t, torch.exp(dt_t * a_t), state)
        ys.append((state * c_t.unsqueeze(-1)).sum(-2))
    return torch.stack(ys), starts


class _ChunkedScan(torch.autograd.Function):
    """``y_t = sum_n C_t h_t``, ``h_t = exp(dt_t A) h_{t-1} + x_t B_t`` with a hand-written chunked backward.

    The forward keeps only the chunk start states ([nc, B, N, D]) for the backward, which recomputes the
    states chunk-parallel and runs the adjoint recurrence ``g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}`` the
    same way, in reverse (chunk-local pass, carry across chunks, true pass).
    """

    @staticmethod
    def forward(ctx, dt_c, x_c, b_c, c_c, a_t):
        y, starts = _scan_forward(dt_c, x_c, b_c, c_c, a_t)
        ctx.save_for_backward(dt_c, x_c, b_c, c_c, a_t, starts)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        dt_c, x_c, b_c, c_c, a_t, starts = ctx.saved_tensors
        dts = [t.unsqueeze(-2) for t in dt_c.unbind(0)]  # [nc, B, 1, D]
        xs = [t.unsqueeze(-2) for t in x_c.unbind(0)]
        gys = [t.unsqueeze(-2) for t in gy.contiguous().unbind(0)]
        bs = [t.unsqueeze(-1) for t in b_c.unbind(0)]  # [nc, B, N, 1]
        cs = [t.unsqueeze(-1) for t in c_c.unbind(0)]
        # recompute the states h_{t-1} entering token t (kept) and grad C_t = sum_d gy_t h_t on the way
        entering, grad_c = [], []
        state = starts
        for dt_t, x_t, b_t, gy_t in zip(dts, xs, bs, gys):
            entering.append(state)
            state = torch.addcmul(b_t * x_t, torch.exp(dt_t * a_t), state)
            grad_c.append((state * gy_t).sum(-1))
        # adjoint entering each chunk from the right: r = exp(dt_0 A) g_0, chunk-local then carried
        into = torch.zeros_like(starts)
        if dt_c.shape[1] > 1:
            for dt_t, c_t, gy_t in zip(dts[::-1], cs[::-1], gys[::-1]):
                into = torch.exp(dt_t * a_t) * torch.addcmul(into, c_t, gy_t)
            chunk_decay = torch.exp(dt_c.sum(0).unsqueeze(-2) * a_t)
            into = _carry(list(into.unbind(0)), list(chunk_decay.unbind(0)), reverse=True)
        grad_dt, grad_x, grad_b = [], [], []
        grad_a = torch.zeros_like(into)
        for t in range(len(dts) - 1, -1, -1):
            decay_t = torch.exp(dts[t] * a_t)
            adjoint = torch.addcmul(into, cs[t], gys[t])  # g_t, [nc, B, N, D]
            grad_x.append((adjoint * bs[t]).sum(-2))
            grad_b.append((adjoint * xs[t]).sum(-1))
            into = decay_t * adjoint
            grad_log_decay = into * entering.pop()  # d loss / d (dt_t A); frees h_{t-1} once used
            grad_dt.append((grad_log_decay * a_t).sum(-2))
            grad_a.addcmul_(grad_log_decay, dts[t])
        grad_dt, grad_x, grad_b = (torch.stack(g[::-1]) for g in (grad_dt, grad_x, grad_b))
        return grad_dt, grad_x, grad_b, torch.stack(grad_c), grad_a.sum((0, 1))


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Chunked selective scan: the result of :func:`selective_scan_ref` in ``2 T + L / T`` tensor steps.

    The sequence is cut into ``n_chunks = ceil(L / T)`` chunks of ``T = min(chunk_size, L)`` tokens (the last
    one zero-padded: a padded token has decay 1 and input 0 and is dropped from the output). Then

    1. every chunk runs the recurrence from a zero state, all chunks at once (``T`` steps on
       [n_chunks, B, N, D] tensors), giving each chunk's end state;
    2. the end states are carried across chunks, ``H_c = exp(A sum_{t in c} dt_t) H_{c-1} + end_c``
       (``n_chunks`` steps on [B, N, D] tensors): the state entering every chunk;
    3. every chunk runs again from its true entering state, reading out ``y_t = sum_n C_t[n] h_t[n]``.

    The backward (a custom autograd function) does the same for the adjoint recurrence, in reverse. Only
    ``exp`` of ``dt * A`` (non-positive for every Mamba ``A``) is taken, so nothing overflows or needs masking.
    Memory: the autograd graph keeps O(B * D * L) plus the entering states O(B * D * N * L / T); the backward
    holds O(B * D * N * L) transiently, one state tensor (no ``T x T`` segment matrix is formed). Double
    backward is not supported.
    ``T`` near ``sqrt(L)`` is fastest; 32-128 suits 10^3-10^4 tokens.

    Under tracing, ``torch.export``/ONNX export and ``torch.compile`` (or without gradients) the same forward
    runs as plain tensor operations, so the graph is exportable.

    Args:
        u: input, [B, D, L].
        delta: step size before bias/softplus, [B, D, L].
        A: state matrix, [D, N].
        B: input projection, [B, N, L].
        C: output projection, [B, N, L].
        D: skip weight, [D], or None.
        z: gate, [B, D, L], or None.
        delta_bias: bias added to ``delta``, [D], or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        chunk_size: tokens per chunk ``T`` (>= 1).

    Returns:
        y, [B, D, L], dtype of ``u``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    dtype = u.dtype
    u = u.float()
    length = u.shape[-1]
    if length == 0:
        return u.to(dtype)
    dt = _step_size(delta, delta_bias, delta_softplus)
    chunk = min(int(chunk_size), length)
    n_chunks = math.ceil(length / chunk)
    chunked = [_to_chunks(t, n_chunks, chunk) for t in (dt, dt * u, B.float(), C.float())]
    a_t = A.float().t().contiguous()  # [N, D]
    plain = (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or not (torch.is_grad_enabled() and any(t.requires_grad for t in (*chunked, a_t)))
    )
    y = _scan_forward(*chunked, a_t)[0] if plain else _ChunkedScan.apply(*chunked, a_t)
    return _skip_and_gate(_from_chunks(y, length), u, D, z, dtype)
