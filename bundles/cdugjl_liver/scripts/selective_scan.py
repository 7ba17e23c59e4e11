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

# The backward recomputes the states in blocks of this many tokens from the states the forward kept.
_KEEP_EVERY = 8


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
    """[B, K, L] -> time-major chunks [T, n_chunks, B, K] (zero-padded to ``n_chunks * T`` tokens), out of place."""
    pad = n_chunks * chunk - x.shape[-1]
    x = x.permute(2, 0, 1)  # [L, B, K]
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.reshape(n_chunks, chunk, x.shape[1], x.shape[2]).transpose(0, 1)


def _scan_exportable(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    chunk: int,
) -> torch.Tensor:
    """The chunked scan of :func:`selective_scan_chunked` in out-of-place operations only, for
    ``torch.jit.trace``, ``torch.export``/ONNX export and ``torch.compile`` (autograd records it as usual)."""
    dtype, u = u.dtype, u.float()
    length = u.shape[-1]
    n_chunks = math.ceil(length / chunk)
    dt = _step_size(delta, delta_bias, delta_softplus)
    dt_c, x_c, b_c, c_c = (_to_chunks(t, n_chunks, chunk) for t in (dt, dt * u, B.float(), C.float()))
    a = A.float().t()  # [N, D]
    steps = list(zip(dt_c.unsqueeze(-2).unbind(0), x_c.unsqueeze(-2).unbind(0), b_c.unsqueeze(-1).unbind(0)))
    state = u.new_zeros(n_chunks, u.shape[0], a.shape[0], u.shape[1])  # [n_chunks, B, N, D]
    if n_chunks > 1:
        for dt_t, x_t, b_t in steps:  # end state of every chunk run from zero
            state = torch.addcmul(b_t * x_t, torch.exp(dt_t * a), state)
        carried, entering = torch.zeros_like(state[0]), []
        for local, decay in zip(state.unbind(0), torch.exp(dt_c.sum(0).unsqueeze(-2) * a).unbind(0)):
            entering.append(carried)
            carried = torch.addcmul(local, decay, carried)
        state = torch.stack(entering)
    ys = []
    for (dt_t, x_t, b_t), c_t in zip(steps, c_c.unsqueeze(-1).unbind(0)):
        state = torch.addcmul(b_t * x_t, torch.exp(dt_t * a), state)
        ys.append((state * c_t).sum(-2))
    y = torch.stack(ys).transpose(0, 1).reshape(n_chunks * chunk, u.shape[0], u.shape[1])[:length]
    return _skip_and_gate(y.permute(1, 2, 0), u, D, z, dtype)


def _chunk_layout(x: torch.Tensor, n_chunks: int, chunk: int) -> torch.Tensor:
    """[B, K, L] -> a new float32 tensor of time-major chunks [T, n_chunks * B, K], zero-padded to ``n_chunks * T``.

    Row ``c * B + b`` of token ``t`` holds token ``c * T + t`` of sequence ``b``.
    """
    batch, k, length = x.shape
    if x.is_contiguous():  # L is the fastest axis: one 2D transposition (PyTorch's blocked kernel) to [L, B, K]
        tokens = x.reshape(batch * k, length).t().contiguous().view(length, batch, k)
    else:  # e.g. a transposed [B, L, K] projection: copied as it is read, K-contiguous rows
        tokens = x.permute(2, 0, 1)
    out = x.new_empty(chunk, n_chunks, batch, k, dtype=torch.float32)
    whole, rest = divmod(length, chunk)
    out[:, :whole] = tokens[: whole * chunk].unflatten(0, (whole, chunk)).transpose(0, 1)
    if rest:  # the last chunk, partly padding
        out[:rest, whole] = tokens[whole * chunk :]
        out[rest:, whole] = 0.0
    return out.view(chunk, n_chunks * batch, k)


def _sequence_layout(x: torch.Tensor, batch: int, length: int, contiguous: bool = False) -> torch.Tensor:
    """Inverse of :func:`_chunk_layout`: [T, n_chunks * B, K] -> [B, K, length].

    A permuted view of a [length, B, K] tensor, or (``contiguous``) a contiguous tensor.
    """
    chunk, rows, k = x.shape
    tokens = x.view(chunk, rows // batch, batch, k).transpose(0, 1).reshape(-1, batch, k)[:length]
    if contiguous:
        return tokens.reshape(length, batch * k).t().contiguous().view(batch, k, length)
    return tokens.permute(1, 2, 0)


def _carry(local: torch.Tensor, chunk_decay: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Carry per-chunk quantities across chunks: ``H_c = local_{c-1} + chunk_decay_{c-1} H_{c-1}``, ``H_0 = 0``.

    Args:
        local: per chunk, the value accumulated within the chunk from zero, [n_chunks, B, N, D].
        chunk_decay: per chunk, the product of its token decays, [n_chunks, B, N, D].
        reverse: run from the last chunk to the first (the adjoint in the backward pass).

    Returns:
        [n_chunks, B, N, D]: the value entering each chunk (zero for the first one in scan order).
    """
    order = list(range(local.shape[0]))
    if reverse:
        order.reverse()
    entering = torch.empty_like(local)
    entering[order[0]].zero_()
    for prev, c in zip(order[:-1], order[1:]):
        torch.addcmul(local[prev], chunk_decay[prev], entering[prev], out=entering[c])
    return entering


class _Chunks:
    """Token-by-token access to scan inputs in chunk layout (``M = n_chunks * B`` rows, states [M, N, D]).

    Each method works on one token of every chunk at once, an [M, N, D] slice that stays in cache, and
    writes into buffers allocated once per call (a fresh tensor per token costs page faults).

    Args:
        dt: step sizes, [T, M, D].
        x: step size times input, [T, M, D].
        b: input projection, [T, M, N].
        c: output projection, [T, M, N].
        a: state matrix transposed, [N, D].
        batch: B, the number of sequences.
    """

    def __init__(
        self, dt: torch.Tensor, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, a: torch.Tensor, batch: int
    ) -> None:
        self.steps, self.rows, self.dim = dt.shape
        self.batch, self.n_chunks, self.d_state = batch, dt.shape[1] // batch, a.shape[0]
        self.inputs, self.a, self.total_dt = (dt, x, b, c), a, dt.sum(0)
        self.dt, self.x = dt.unsqueeze(2).unbind(0), x.unsqueeze(2).unbind(0)  # per token [M, 1, D]
        self.b, self.b_row = b.unsqueeze(3).unbind(0), b.unsqueeze(2).unbind(0)  # [M, N, 1], [M, 1, N]
        self.c, self.c_row = c.unsqueeze(3).unbind(0), c.unsqueeze(2).unbind(0)

    def buffer(self, *lead: int) -> torch.Tensor:
        """An uninitialised [*lead, M, N, D] float32 buffer."""
        return self.a.new_empty(*lead, self.rows, self.d_state, self.dim)

    def decay(self, t: int, out: torch.Tensor) -> torch.Tensor:
        """``exp(dt_t A)`` of token ``t`` of every chunk, written to ``out`` [M, N, D]."""
        return torch.mul(self.dt[t], self.a, out=out).exp_()

    def step(self, t: int, state: torch.Tensor, decay: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``h_t = decay_t h_{t-1} + x_t B_t``, in place on ``state`` or written to ``out``, [M, N, D]."""
        state = state.mul_(decay) if out is None else torch.mul(state, decay, out=out)
        return state.addcmul_(self.b[t], self.x[t])

    def _across_chunks(self, local: torch.Tensor, reverse: bool) -> torch.Tensor:
        """:func:`_carry` of chunk-local values [M, N, D] with the chunks' total decays."""
        total = self.total_dt.view(self.n_chunks, self.batch, 1, self.dim)
        shape = (self.n_chunks, self.batch, self.d_state, self.dim)
        return _carry(local.view(shape), torch.exp(total * self.a), reverse).view_as(local)

    def starts(self, work: torch.Tensor) -> torch.Tensor:
        """State entering every chunk, [M, N, D] (the scan starts from zero); ``work`` is scratch [M, N, D]."""
        state = self.buffer()
        if self.n_chunks == 1:
            return state.zero_()
        torch.mul(self.b[0], self.x[0], out=state)  # the end state of every chunk run from zero
        for t in range(1, self.steps):
            self.step(t, state, self.decay(t, work))
        return self._across_chunks(state, reverse=False)

    def adjoint_ends(self, gy: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        """Adjoint entering every chunk from the right (``exp(dt_0 A) g_0`` of the next chunk), [M, N, D].

        Args:
            gy: gradient of the readout, per token [M, 1, D].
            work: scratch, [M, N, D].
        """
        adjoint = self.buffer()
        if self.n_chunks == 1:
            return adjoint.zero_()
        torch.mul(self.c[-1], gy[-1], out=adjoint).mul_(self.decay(self.steps - 1, work))
        for t in range(self.steps - 2, -1, -1):  # each chunk's own contribution, from zero
            adjoint.addcmul_(self.c[t], gy[t]).mul_(self.decay(t, work))
        return self._across_chunks(adjoint, reverse=True)


def _scan_forward(chunks: _Chunks, keep: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Readout ``y_t = sum_n C_t[n] h_t[n]`` of every token of every chunk.

    Args:
        chunks: the scan inputs.
        keep: also return the states entering tokens ``0, _KEEP_EVERY, 2 _KEEP_EVERY, ...`` of every chunk.

    Returns:
        y [T, M, D] and the kept states [ceil(T / _KEEP_EVERY), M, N, D] (or None).
    """
    work = chunks.buffer()
    state = chunks.starts(work)
    kept = chunks.buffer(-(-chunks.steps // _KEEP_EVERY)) if keep else None
    y = state.new_empty(chunks.steps, chunks.rows, 1, chunks.dim)
    for t, (y_t, c_t) in enumerate(zip(y.unbind(0), chunks.c_row)):
        if keep and t % _KEEP_EVERY == 0:
            kept[t // _KEEP_EVERY] = state
        chunks.step(t, state, chunks.decay(t, work))
        torch.bmm(c_t, state, out=y_t)
    return y.squeeze(2), kept


def _scan_backward(chunks: _Chunks, kept: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of ``sum_t gy_t y_t`` through the scan: the adjoint recurrence, run like the forward in reverse.

    The adjoint ``g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}`` enters every chunk from
    :meth:`_Chunks.adjoint_ends`; then blocks of ``_KEEP_EVERY`` tokens are taken from last to first: the
    block's states and decays are recomputed from the kept state into small reused buffers, and the adjoint
    runs back through the block.

    Args:
        chunks: the scan inputs.
        kept: the states kept by :func:`_scan_forward`, [ceil(T / _KEEP_EVERY), M, N, D].
        gy: gradient of ``y``, [T, M, D].

    Returns:
        Gradients of dt (through the decays only) [T, M, D], x [T, M, D], b [T, M, N], c [T, M, N] and of the
        transposed state matrix [N, D].
    """
    steps, rows, n, d = chunks.steps, chunks.rows, chunks.d_state, chunks.dim
    a, dt, x, b_row, c = chunks.a, chunks.dt, chunks.x, chunks.b_row, chunks.c
    gy = gy.unsqueeze(2).unbind(0)  # per token [M, 1, D]
    work = chunks.buffer()
    adjoint = chunks.adjoint_ends(gy, work)
    states, decays = chunks.buffer(_KEEP_EVERY).unbind(0), chunks.buffer(_KEEP_EVERY).unbind(0)
    grad_dt, grad_x = a.new_empty(steps, rows, d), a.new_empty(steps, rows, 1, d)
    grad_b, grad_c = a.new_empty(steps, rows, 1, n), a.new_empty(steps, rows, 1, n)
    grad_dt_t, grad_x_t, grad_b_t, grad_c_t = (g.unbind(0) for g in (grad_dt, grad_x, grad_b, grad_c))
    grad_a = torch.zeros_like(work)
    for first in range(_KEEP_EVERY * ((steps - 1) // _KEEP_EVERY), -1, -_KEEP_EVERY):
        block = range(first, min(first + _KEEP_EVERY, steps))
        entering = [kept[first // _KEEP_EVERY], *states[: len(block) - 1]]  # h_{t-1} for t in block
        for t, h_prev, h, decay in zip(block, entering, states, decays):
            chunks.step(t, h_prev, chunks.decay(t, decay), out=h)
            torch.bmm(gy[t], h.transpose(1, 2), out=grad_c_t[t])
        for j in range(len(block) - 1, -1, -1):
            t = block[j]
            adjoint.addcmul_(c[t], gy[t])  # g_t
            torch.bmm(b_row[t], adjoint, out=grad_x_t[t])
            torch.bmm(x[t], adjoint.transpose(1, 2), out=grad_b_t[t])
            adjoint.mul_(decays[j])
            grad_log_decay = torch.mul(adjoint, entering[j], out=work)  # d loss / d (dt_t A)
            grad_a.addcmul_(grad_log_decay, dt[t])
            torch.sum(grad_log_decay.mul_(a), 1, out=grad_dt_t[t])
    return grad_dt, grad_x.squeeze(2), grad_b.squeeze(2), grad_c.squeeze(2), grad_a.sum(0)


def _forward(
    u: torch.Tensor,
    delta: torch.Tensor,
    a_t: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    chunk: int,
    keep: bool = False,
) -> tuple[torch.Tensor, dict]:
    """:func:`selective_scan_chunked` with chunks of ``chunk`` tokens (``a_t = A^T`` [N, D], D and delta_bias
    float32).

    Returns:
        The result [B, D, L] (float32) and what the backward needs: ``chunks`` (:class:`_Chunks`), and in
        chunk layout [T, M, D] ``u``, ``z`` (or None) and ``y`` before the gate; ``kept``, the states from
        :func:`_scan_forward` (None unless ``keep``).
    """
    batch, length = u.shape[0], u.shape[-1]
    n_chunks = -(-length // chunk)
    u_c = _chunk_layout(u, n_chunks, chunk)
    dt = _chunk_layout(delta, n_chunks, chunk)
    if delta_bias is not None:
        dt += delta_bias
    if delta_softplus:
        dt = F.softplus(dt)
    if length % chunk:
        dt[length % chunk :, -batch:] = 0.0  # padding: decay 1 and no input
    b_c, c_c = (_chunk_layout(t, n_chunks, chunk) for t in (B, C))
    chunks = _Chunks(dt, dt * u_c, b_c, c_c, a_t, batch)
    y, kept = _scan_forward(chunks, keep)
    if D is not None:
        y.addcmul_(u_c, D)
    z_c = None if z is None else _chunk_layout(z, n_chunks, chunk)
    out = y if z_c is None else F.silu(z_c).mul_(y)
    saved = {"chunks": chunks, "u": u_c, "z": z_c, "y": y, "kept": kept}
    return _sequence_layout(out, batch, length), saved


class _SelectiveScan(torch.autograd.Function):
    """:func:`selective_scan_chunked` (step size, scan, skip and gate) with a hand-written backward.

    The forward keeps its float32 inputs in chunk layout and the states entering every ``_KEEP_EVERY``-th
    token of every chunk; the backward recomputes the other states block by block.
    """

    @staticmethod
    def forward(ctx, u, delta, a_t, B, C, D, z, delta_bias, delta_softplus, chunk):
        out, saved = _forward(u, delta, a_t, B, C, D, z, delta_bias, delta_softplus, chunk, keep=True)
        chunks = saved["chunks"]
        ctx.shape = (chunks.batch, u.shape[-1], chunk)
        ctx.has_bias, ctx.softplus = delta_bias is not None, delta_softplus
        ctx.contiguous = tuple(t is not None and t.is_contiguous() for t in (u, delta, B, C, z))
        gate = (saved["z"], saved["y"]) if z is not None else (None, None)
        ctx.save_for_backward(*chunks.inputs, a_t, saved["u"], D, *gate, saved["kept"])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        dt, x, b, c, a_t, u, D, z, y, kept = ctx.saved_tensors
        batch, length, chunk = ctx.shape
        chunks = _Chunks(dt, x, b, c, a_t, batch)
        grad = _chunk_layout(grad_out, chunks.n_chunks, chunk)  # of y * silu(z)
        grad_z = grad_D = grad_bias = None
        if z is not None:
            sig = torch.sigmoid(z)
            grad_z = torch.mul(grad, y).mul_(sig * (1 + z * (1 - sig)))  # d silu(z) / dz
            grad.mul_(sig.mul_(z))  # silu(z)
        if D is not None:
            grad_D = (grad * u).sum((0, 1))
        grad_dt, grad_x, grad_b, grad_c, grad_a = _scan_backward(chunks, kept, grad)
        grad_dt.addcmul_(grad_x, u)
        grad_u = grad_x.mul_(dt)
        if D is not None:
            grad_u.addcmul_(grad, D)
        if ctx.softplus:  # softplus'(delta + delta_bias) = sigmoid(delta + delta_bias) = -expm1(-dt)
            grad_dt.mul_(torch.neg(dt).expm1_()).neg_()
        if ctx.has_bias:
            grad_bias = grad_dt.sum((0, 1))
        grad_u, grad_dt, grad_b, grad_c, grad_z = (
            None if g is None else _sequence_layout(g, batch, length, contiguous)
            for g, contiguous in zip((grad_u, grad_dt, grad_b, grad_c, grad_z), ctx.contiguous)
        )
        return grad_u, grad_dt, grad_a, grad_b, grad_c, grad_D, grad_z, grad_bias, None, None


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
       [n_chunks * B, N, D] tensors), giving each chunk's end state;
    2. the end states are carried across chunks, ``H_c = exp(A sum_{t in c} dt_t) H_{c-1} + end_c``
       (``n_chunks`` steps on [B, N, D] tensors): the state entering every chunk;
    3. every chunk runs again from its true entering state, reading out ``y_t = sum_n C_t[n] h_t[n]``.

    With gradients, a custom autograd function runs the whole (step size, scan, ``D`` skip, ``silu(z)`` gate)
    and its hand-written backward: the adjoint recurrence ``g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}`` runs the
    same way in reverse, with the states recomputed in blocks of ``_KEEP_EVERY`` tokens from the states the
    forward kept. Every per-token operation works in place on cache-sized [n_chunks * B, N, D] buffers
    allocated once per call. Only ``exp`` of ``dt * A`` (non-positive for every Mamba ``A``) is taken, so
    nothing overflows or needs masking. On a CPU the time is about 26 passes over B * D * N * L state elements
    per forward + backward (9 forward, 17 backward), each an eager PyTorch operation on a [n_chunks * B, N, D]
    slice. Memory: the forward keeps O(B * D * L) plus the kept states
    O(B * D * N * L / _KEEP_EVERY) for the backward, which holds O(B * D * N * (L / T) * _KEEP_EVERY) more
    (no [B, D, N, L] tensor and no ``T x T`` segment matrix is formed). Double backward is not supported.
    ``T`` = 64-128 suits 10^3-10^4 tokens.

    Under tracing, ``torch.export``/ONNX export and ``torch.compile`` the same recurrence runs as out-of-place
    tensor operations, so the graph is exportable (and differentiable by autograd).

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
    length = u.shape[-1]
    if length == 0:
        return u.clone()
    chunk = min(int(chunk_size), length)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return _scan_exportable(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)
    # plain tensors (e.g. not MONAI MetaTensors): no subclass dispatch in the many small operations below
    u, delta, B, C, z = (None if t is None else t.as_subclass(torch.Tensor) for t in (u, delta, B, C, z))
    a_t = A.float().t().contiguous()  # [N, D]
    D, delta_bias = (None if t is None else t.float() for t in (D, delta_bias))
    args = (u, delta, a_t, B, C, D, z, delta_bias, delta_softplus, chunk)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
        return _SelectiveScan.apply(*args).to(u.dtype)
    return _forward(*args)[0].to(u.dtype)
