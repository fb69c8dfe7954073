"""The NumPy backend and float64 reference: the kernels' blocked algorithm, vectorized.

Functions mirror the `cce_cupy.cuda` launchers on flattened, validated arrays (targets already shifted):

    forward(e, c, targets, bias, opts, bad_target=None) -> (lse, tgt)
    backward(e, c, targets, bias, opts, lse, coef_p, coef_q) -> (de, dc, dbias)
    cross_entropy_logits(logits, targets, opts, row_grad=None, bad_target=None) -> (lse, tgt)

The logits are visited in blocks of at most `BLOCK_BYTES` (rows x columns of the accumulation
type), so N x V is never allocated. Rows and columns of a block start on multiples of 128, the
kernels' tile size. Gradient filtering follows the certified rule of the CUDA sparse backward
(RowCertificate), so the CPU backend predicts its error. Accumulation is fp32 (float64 when the
inputs are float64: the ground truth of the tests); 16-bit inputs (bfloat16 through ml_dtypes)
are upcast a block at a time. Unlike the kernels, the logit gradient is not rounded to the input
dtype before the two gradient GEMMs.
"""

from __future__ import annotations

import numpy as np

from cce_cupy.cuda.sources import TILE_M
from cce_cupy.options import CCEOptions, acc_dtype, analytic_smoothing, certificate_margin, grad_dtype, z_loss_dlse

TILE = TILE_M  # the kernels' logit tile (square: TILE_M = TILE_N, asserted in common.cuh)
BLOCK_BYTES = 16 << 20  # one block of logits (and each temporary like it) stays under this

_FLAG = np.zeros(1, dtype=np.int32)


def target_error_flag() -> np.ndarray:
    """The NumPy backend's out-of-range-target flag ((1,) int32); set here, never cleared here."""
    return _FLAG


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def block_shape(n: int, v: int, itemsize: int = 4, budget: int | None = None) -> tuple[int, int]:
    """(rows, columns) of a logit block: multiples of 128 (or all of n / v), rows*cols*itemsize <= budget.

    At least one 128 x 128 tile, so a block may pass `budget` only when budget < 128*128*itemsize.
    `budget` defaults to the module's BLOCK_BYTES (read at call time).
    """
    budget = BLOCK_BYTES if budget is None else budget
    cols = max(TILE, (budget // (max(n, 1) * itemsize)) // TILE * TILE)
    cols = min(cols, _round_up(max(v, 1), TILE))
    rows = max(TILE, (budget // (cols * itemsize)) // TILE * TILE)
    return min(rows, max(n, 1)), min(cols, max(v, 1))


def _blocks(n: int, v: int, itemsize: int):
    rb, cb = block_shape(n, v, itemsize)
    for r0 in range(0, n, rb):
        yield r0, min(n, r0 + rb), [(v0, min(v, v0 + cb)) for v0 in range(0, v, cb)]


def _raw_logits(e_blk, c, bias, v0: int, v1: int, acc):
    """z = e_blk @ c[v0:v1].T + bias[v0:v1] in the accumulation dtype (before the softcap)."""
    z = e_blk @ c[v0:v1].astype(acc, copy=False).T
    if bias is not None:
        z += bias[v0:v1].astype(acc, copy=False)
    return z


def _softcap(z, opts: CCEOptions):
    if opts.softcap is None:
        return z
    s = z.dtype.type(opts.softcap)
    return s * np.tanh(z / s)


def softcap_grad(z, softcap: float):
    """d softcap(z) / dz = 1 - tanh^2(z / s), as 4 u / (1 + u)^2 with u = exp(-2 |z / s|): it keeps
    its relative accuracy where tanh saturates, which 1 - (y / s)^2 loses (as in the kernels)."""
    u = np.exp(-2.0 * np.abs(z / z.dtype.type(softcap)))
    return 4.0 * u / (1.0 + u) ** 2


def _logits(e_blk, c, bias, opts: CCEOptions, v0: int, v1: int, acc):
    """y = softcap(e_blk @ c[v0:v1].T + bias[v0:v1]) in the accumulation dtype."""
    return _softcap(_raw_logits(e_blk, c, bias, v0, v1, acc), opts)


def forward(e, c, targets, bias, opts: CCEOptions, bad_target=None):
    """Per-row (lse, tgt) of y = softcap(e @ c.T + bias), by an online logsumexp over V blocks.

    e (N, D), c (V, D), bias (V,) or None, targets (N,) already shifted. Returns fp32 arrays
    (float64 for float64 inputs). tgt is 0 for ignored rows and NaN for a target outside [0, V)
    that is not ignore_index, which also sets `bad_target[0] = 1` (default: this module's flag).
    """
    n, _ = e.shape
    v = c.shape[0]
    acc = acc_dtype(e.dtype)
    lse = np.empty(n, dtype=acc)
    tgt = np.empty(n, dtype=acc)
    t_all = np.asarray(targets).astype(np.int64)
    ls = opts.label_smoothing
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for r0, r1, cols in _blocks(n, v, acc.itemsize):
            e_blk = e[r0:r1].astype(acc)
            t = t_all[r0:r1]
            valid = t != opts.ignore_index
            run_max = np.full(r1 - r0, -np.inf, dtype=acc)
            run_sum = np.zeros(r1 - r0, dtype=acc)
            ysum = np.zeros(r1 - r0, dtype=acc)
            yt = np.zeros(r1 - r0, dtype=acc)
            for v0, v1 in cols:
                y = _logits(e_blk, c, bias, opts, v0, v1, acc)
                new_max = np.maximum(run_max, y.max(axis=1))
                # A row with no finite logit yet (all -inf so far: masked columns) shifts by 0, not by
                # -inf: exp(-inf - -inf) would be NaN; its terms are then exp(-inf) = 0.
                shift = np.where(new_max == -np.inf, 0.0, new_max)
                run_sum = run_sum * np.exp(run_max - shift) + np.exp(y - shift[:, None]).sum(axis=1)
                run_max = new_max
                if ls > 0.0:
                    ysum += y.sum(axis=1)
                # The target logit from this same block (not a separate dot), so lse >= y_t exactly.
                rows = np.flatnonzero(valid & (t >= v0) & (t < v1))
                yt[rows] = y[rows, t[rows] - v0]
            lse[r0:r1] = run_max + np.log(run_sum)
            tg = (1.0 - ls) * yt + (ls / v) * ysum if ls > 0.0 else yt
            tg[~valid] = 0.0
            tg[valid & ((t < 0) | (t >= v))] = np.nan
            tgt[r0:r1] = tg
    bad = (t_all != opts.ignore_index) & ((t_all < 0) | (t_all >= v))
    if bad.any():
        (target_error_flag() if bad_target is None else bad_target)[0] = 1
    return lse, tgt


def filter_threshold(opts: CCEOptions) -> float | None:
    """The candidate threshold eps on the softmax (None: exact)."""
    return opts.resolved_filter_eps()


def _grad_block(z, t, lse, coef_p, coef_q, opts: CCEOptions, v0: int, v: int):
    """(g, p, onehot) of one block of logits z before the softcap (rows r, columns [v0, v0 + width)):
    g = dL/dz, exact."""
    y = _softcap(z, opts)
    cols = np.arange(v0, v0 + y.shape[1])
    onehot = t[:, None] == cols[None, :]
    # A row whose logits are all -inf has lse = -inf and no distribution: p = 0, not NaN (its loss
    # is NaN when it is not ignored; an ignored one must not poison dC with 0 * NaN).
    p = np.exp(y - np.where(lse == -np.inf, np.inf, lse)[:, None])
    ls = opts.label_smoothing
    q = np.where(onehot, 1.0 - ls, 0.0) + ls / v if ls > 0.0 else onehot
    g = coef_p[:, None] * p - coef_q[:, None] * q
    if opts.softcap is not None:
        g *= softcap_grad(z, opts.softcap)
    return g, p, onehot


def logit_grad(z, t, lse, coef_p, coef_q, opts: CCEOptions, v0: int, v: int):
    """dL/dz of one block of logits z before the softcap (rows r, columns [v0, v0 + width)), exact."""
    g, _, _ = _grad_block(z, t, lse, coef_p, coef_q, opts, v0, v)
    return g.astype(z.dtype, copy=False)


class RowCertificate:
    """The per-row certificate of the filtered backward, accumulated over column blocks.

    Row i keeps K_i = {j : p_ij >= eps} + {t_i}. Dropping the rest changes the row's logit gradient
    by at most  bound_i = |coef_p_i| * dropped_i  (+ |coef_q_i| ls (V - |K_i|) / V with softcap and
    smoothing) in L1, dropped_i = sum over the dropped columns of p_ij. lower_i = sum over K_i of
    |g_ij| is a lower bound of ||g_i||_1. Certified: bound_i (1 + certificate_margin(V)) <= tol lower_i,
    or bound_i = 0. See docs/design.md, "Certified filtering".
    """

    def __init__(self, rows: int, eps: float, acc) -> None:
        self.eps = eps
        self.dropped = np.zeros(rows, dtype=acc)
        self.lower = np.zeros(rows, dtype=acc)
        self.kept = np.zeros(rows, dtype=np.int64)

    def keep(self, p, onehot):
        return (p >= self.eps) | onehot

    def add(self, g, p, onehot) -> None:
        keep = self.keep(p, onehot)
        self.dropped += np.where(keep, 0.0, p).sum(axis=1)
        self.lower += np.where(keep, np.abs(g), 0.0).sum(axis=1)
        self.kept += keep.sum(axis=1)

    def bound(self, coef_p, coef_q, opts: CCEOptions, v: int):
        b = np.abs(coef_p) * self.dropped
        if opts.label_smoothing > 0.0 and not analytic_smoothing(opts):
            b = b + np.abs(coef_q) * opts.label_smoothing * (v - self.kept) / v
        return b

    def certified(self, coef_p, coef_q, opts: CCEOptions, v: int, tol: float):
        """Bool per row; NaN anywhere leaves a row uncertified (exact)."""
        b = self.bound(coef_p, coef_q, opts, v)
        return (b == 0.0) | (b * (1.0 + certificate_margin(v)) <= tol * self.lower)


def filtered_grad_block(g, p, onehot, coef_q, opts: CCEOptions, v: int, cert: RowCertificate, certified):
    """The filtered logit gradient of one block: certified rows keep K_i (and, with analytic
    smoothing, the constant -coef_q ls / V on the dropped columns); other rows are exact."""
    keep = cert.keep(p, onehot) | ~certified[:, None]
    fill = (-coef_q * (opts.label_smoothing / v))[:, None] if analytic_smoothing(opts) else 0.0
    return np.where(keep, g, fill)


def backward(e, c, targets, bias, opts: CCEOptions, lse, coef_p, coef_q, stats=None):
    """(de, dc, dbias) for dL/dy = coef_p * softmax - coef_q * smoothed_onehot (see options.py).

    Recomputes the logits block by block. With filter_eps, the certified rule of the CUDA sparse
    backward (RowCertificate): a first pass over each row block's column blocks certifies its rows,
    a second one sums the filtered gradient (exact for uncertified rows). `stats`, if a dict, gets
    "rows" (with a nonzero coefficient) and "certified_rows" counts added. dbias is None without
    bias. Gradients are in the input dtype, or fp32 with grad_dtype="float32".
    """
    n, d = e.shape
    v = c.shape[0]
    acc = acc_dtype(e.dtype)
    de = np.zeros((n, d), dtype=acc)
    dc = np.zeros((v, d), dtype=acc)
    db = np.zeros(v, dtype=acc) if bias is not None else None
    eps, tol = filter_threshold(opts), opts.resolved_filter_tol()
    t_all = np.asarray(targets).astype(np.int64)
    lse = np.asarray(lse, dtype=acc)
    coef_p = np.asarray(coef_p, dtype=acc)
    coef_q = np.asarray(coef_q, dtype=acc)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for r0, r1, cols in _blocks(n, v, acc.itemsize):
            e_blk = e[r0:r1].astype(acc)
            rows = (t_all[r0:r1], lse[r0:r1], coef_p[r0:r1], coef_q[r0:r1])
            certified = cert = None
            if eps is not None:
                cert = RowCertificate(r1 - r0, eps, acc)
                for v0, v1 in cols:
                    cert.add(*_grad_block(_raw_logits(e_blk, c, bias, v0, v1, acc), *rows, opts, v0, v))
                certified = cert.certified(rows[2], rows[3], opts, v, tol)
                if stats is not None:
                    active = (rows[2] != 0) | (rows[3] != 0)
                    stats["rows"] = stats.get("rows", 0) + int(active.sum())
                    stats["certified_rows"] = stats.get("certified_rows", 0) + int((active & certified).sum())
            for v0, v1 in cols:
                g, p, onehot = _grad_block(_raw_logits(e_blk, c, bias, v0, v1, acc), *rows, opts, v0, v)
                if cert is not None:
                    g = filtered_grad_block(g, p, onehot, rows[3], opts, v, cert, certified)
                g = g.astype(acc, copy=False)
                de[r0:r1] += g @ c[v0:v1].astype(acc, copy=False)
                dc[v0:v1] += g.T @ e_blk
                if db is not None:
                    db[v0:v1] += g.sum(axis=0)
    gdt = grad_dtype(e.dtype, opts)
    return de.astype(gdt), dc.astype(gdt), (None if db is None else db.astype(gdt))


def cross_entropy_logits(logits, targets, opts: CCEOptions, row_grad=None, bad_target=None):
    """(lse, tgt) of materialized logits (N, V), like launch_cross_entropy.

    With row_grad ((N,) upstream gradient of each per-token loss), `logits` is overwritten in place
    with dloss/dlogits = coef_p * softmax - g * smoothed_onehot (times the softcap derivative),
    where g = row_grad (0 for ignored rows) and coef_p = g * (1 + 2 z_loss lse).
    """
    n, v = logits.shape
    acc = acc_dtype(logits.dtype)
    lse = np.empty(n, dtype=acc)
    tgt = np.empty(n, dtype=acc)
    t_all = np.asarray(targets).astype(np.int64)
    rb = max(1, BLOCK_BYTES // max(1, v * acc.itemsize))
    ls = opts.label_smoothing
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for r0 in range(0, n, rb):
            r1 = min(n, r0 + rb)
            z = logits[r0:r1].astype(acc)
            y = _softcap(z, opts)
            m = y.max(axis=1)
            m_safe = np.where(m == -np.inf, 0.0, m)
            l_blk = m_safe + np.log(np.exp(y - m_safe[:, None]).sum(axis=1))
            lse[r0:r1] = l_blk
            t = t_all[r0:r1]
            valid = t != opts.ignore_index
            in_range = (t >= 0) & (t < v)
            ok = valid & in_range
            tg = np.zeros(r1 - r0, dtype=acc)
            rows = np.nonzero(ok)[0]
            tg[rows] = (1.0 - ls) * y[rows, t[rows]]
            if ls > 0.0:
                tg[ok] += (ls / v) * y[ok].sum(axis=1)
            tg[valid & ~in_range] = np.nan
            tgt[r0:r1] = tg
            if row_grad is not None:
                g = np.where(valid, np.asarray(row_grad[r0:r1], dtype=acc), 0.0).astype(acc)
                cp = g * (1.0 + z_loss_dlse(opts.z_loss, l_blk))
                logits[r0:r1] = logit_grad(z, t, l_blk, cp, g, opts, 0, v).astype(logits.dtype)
    bad = (t_all != opts.ignore_index) & ((t_all < 0) | (t_all >= v))
    if bad.any():
        (target_error_flag() if bad_target is None else bad_target)[0] = 1
    return lse, tgt


__all__ = ["BLOCK_BYTES", "backward", "block_shape", "cross_entropy_logits", "forward", "target_error_flag"]
