"""Multi-GPU scaling of the JAX loss: fwd+bwd under `jit`, vocab-, data- and mixed-parallel, against
the smallest mesh that holds the problem.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/scale.py --gpu-counts 2,4,8 \\
        --shapes gemma2,llama3,vocab1m --out benchmarks/results/<gpu>-<date>-scale.json
    python benchmarks/scale.py --cpu-smoke --out /tmp/scale.json   # 8 CPU host devices, tiny shapes
    python benchmarks/plot_scale.py /tmp/scale.json -o /tmp/scale.png

Shapes (bf16): gemma2 N=8192, D=2304, V=256000; llama3 N=8192, D=4096, V=128256; vocab1m N=16384,
D=4096, V=1048576. For every k of --gpu-counts (default: 2, 4, 8, ... up to the local device count),
on the first k devices:
  * tp, k GPUs: the N-token problem, the classifier sharded along V (`make_vocab_parallel_loss`),
    once per --reduce-dtypes (its `grad_reduce_dtype`);
  * dp, k GPUs: k * N tokens split over the GPUs, the classifier replicated;
  * mixed, k >= 4 (even): a (dp=2, tp=k/2) mesh on 2 * N tokens, recorded as parallel
    f"dp2xtp{k // 2}" ("dp2xtp2" on 4 GPUs, "dp2xtp4" on 8), once per --reduce-dtypes.
The reference is the smallest mesh that holds the problem: one GPU (`jax_bindings.linear_cross_entropy`)
on N tokens, or tp=r for the shapes of --ref-gpus (default vocab1m=2). A reference whose first call
fails (out of memory) is replaced by tp=2r, 4r, ... (automatically). It is timed in the same rounds.

Efficiency: the reference's GPU-time per token over the setup's (1.0 = perfect scaling):
    efficiency = (r * t_ref / N) / (k * t / tokens)
i.e. with a one-GPU reference: tp t1 / (k t) on the same problem; dp t1 / t on k times the tokens;
dp2 x tp(k/2) 2 t1 / (k t) on twice the tokens. With a tp=2 reference, 2 t2 in place of t1.
`efficiency_vs` names the reference ("1gpu", "tp2").

Rounds time every setup of a shape once, in a shuffled order (a fixed order biases these GPUs by
15-20%); `ms` is the median over rounds: the wall time of one fwd+bwd, during which each of the
setup's GPUs is busy (the per-GPU time).

Agreement with the reference, on the same global problem (the reference is run, untimed, on the
dp * N tokens of a dp setup): `loss_rel_err_vs_ref` = |loss - ref| / |ref|, `de_rel_err_vs_ref` and
`dc_rel_err_vs_ref` = ||x - ref|| / ||ref|| (summed in float32 on device 0, shard by shard copied
there). `loss_rel_err_vs_f64_subset`: the setup's per-row losses (reduction="none") of the first
`subset_rows` (64) tokens against a float64 NumPy reference from the same rounded inputs, C pulled
to the host 2**25 / D rows at a time (256 MiB of float64; 8192 rows at D=4096): at vocab1m 128
chunks of ~0.2 s each on 2 cores (0.06 s bf16 -> float64, 0.10 s matmul), ~25 s once for the shape
(gemma2: 18 such chunks, ~3 s); plus one compile of the per-row loss per setup.

Records (a JSON list; one per setup, every key always present, null where not measured): shape, n
(global tokens), d, v, dtype, gpus, parallel ("none", "tp", "dp", "dp2xtp2", ...), dp, tp,
grad_reduce_dtype (tp > 1), ms, rounds, efficiency, efficiency_vs, reference, loss_rel_err_vs_ref,
de_rel_err_vs_ref, dc_rel_err_vs_ref, loss_rel_err_vs_f64_subset, subset_rows, first_call_s, note;
and gpu, platform, jax, commit, date, cpu_smoke.

Memory at vocab1m: C is 8 GiB in bf16 and dC another 8 GiB (the N x V logits, 64 GiB in fp32,
never exist); E is 128 MiB for N tokens, 1 GiB for the 8 N of dp=8. One H200 (141 GB) holds C + dC
+ E; the issue asks for the reference on the smallest mesh that holds it "comfortably", so the
default reference is tp=2 (4 + 4 GiB a GPU); `--ref-gpus vocab1m=1` takes one GPU. dp setups hold
the whole C and dC on every GPU (one GPU's memory) and all-reduce dC (8 GiB). All setups of a shape
keep their inputs at once (shuffled rounds): at vocab1m on 8 GPUs GPU 0 holds ~37 GiB of
classifier copies (tp2 4, tp4 2, tp8 1, dp2/4/8 8 each, dp2xtp2 4, dp2xtp4 2), plus a call's
outputs and the agreement copies (up to 2 x 8 GiB): ~70 GiB peak, estimated, not measured.

Robust and time-bounded: each setup's build, first call and checks run in try/except (the error
goes to the record's `note`, the run goes on); `--budget-s` (0: none) stops starting new work once
spent (what is left gets `note` "skipped: ..."); the JSON is rewritten after every shape; arrays
and JAX's caches are freed between shapes.

--cpu-smoke: the three shapes shrunk (float32, N=128; vocab1m: D=32, V=4000, its float64 check in
chunks of 1024 rows), on CPU host devices (8 unless XLA_FLAGS already forces a count), --reduce-dtypes
input (with float32 inputs "float32" runs the same path), with the same flow.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "--cpu-smoke" in sys.argv:  # before JAX starts: host devices are fixed at its first use
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_bindings import (  # noqa: E402
    linear_cross_entropy,
    make_vocab_parallel_loss,
    make_vocab_parallel_mesh,
    shard_classifier,
)

SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256), "vocab1m": (16384, 4096, 1048576)}
# --cpu-smoke: V = 500 is padded at tp=8; 4000 is the "large V" stand-in, its f64 check in 4 chunks.
SMOKE_SHAPES = {"gemma2": (128, 32, 500), "llama3": (128, 48, 392), "vocab1m": (128, 32, 4000)}
SMOKE_CHUNK_ROWS = 1024
REF_GPUS = "vocab1m=2"  # shapes whose reference is not one GPU (see the docstring's memory note)
SUBSET_ROWS = 64
F64_CHUNK_BYTES = 2**28  # C rows pulled to the host at a time for the float64 check: 256 MiB of float64


# ------------------------------------------------------------------------------ problem
def _inputs(tokens: int, d: int, v: int, dtype, seed: int = 0):
    """e (tokens, D) ~ N(0, 1), c (V, D) ~ N(0, 1/D) (logits ~ N(0, 1)), targets (tokens,), on the
    default device, drawn in float32 and rounded once, in one jitted program. C is drawn in blocks
    of 2**28 elements: at vocab1m (2**32 elements) a single draw would hold 16 GiB of random bits
    and 16 GiB of float32 before the rounding."""
    rows = max(1, 2**28 // d)

    def normal(key, n, scale):
        blocks = [
            (jax.random.normal(jax.random.fold_in(key, i), (min(rows, n - r0), d), jnp.float32) * scale).astype(dtype)
            for i, r0 in enumerate(range(0, n, rows))
        ]
        return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks)

    @jax.jit
    def draw(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return normal(k1, tokens, 1.0), normal(k2, v, d**-0.5), jax.random.randint(k3, (tokens,), 0, v, jnp.int32)

    return draw(jax.random.key(seed))


def f64_row_losses(e_rows, c, y_rows, chunk_rows: int) -> np.ndarray:
    """Per-row cross-entropy (float64, NumPy) of e_rows (R, D) against the device array c (V, D),
    with C pulled to the host `chunk_rows` rows at a time (an online logsumexp over the chunks)."""
    e64 = np.asarray(e_rows).astype(np.float64)
    y = np.asarray(y_rows).astype(np.int64)
    v = c.shape[0]
    chunk = min(chunk_rows, v)
    take = jax.jit(lambda c_, start: lax.dynamic_slice_in_dim(c_, start, chunk, 0))
    rows = np.arange(len(y))
    m = np.full(len(y), -np.inf)
    s = np.zeros(len(y))
    z_t = np.full(len(y), np.nan)
    for v0 in range(0, v, chunk):
        start = min(v0, v - chunk)  # the last chunk ends at V (dynamic_slice clamps there anyway)
        block = np.asarray(take(c, start)).astype(np.float64)[v0 - start :]
        z = e64 @ block.T
        m_new = np.maximum(m, z.max(axis=1))
        s = s * np.exp(m - m_new) + np.exp(z - m_new[:, None]).sum(axis=1)
        m = m_new
        here = (y >= v0) & (y < v0 + z.shape[1])
        z_t[here] = z[rows[here], y[here] - v0]
    return m + np.log(s) - z_t


# ------------------------------------------------------------------------------- setups
@dataclasses.dataclass
class Setup:
    """One mesh and loss: (dp, tp) = (1, 1) is one GPU; dp * N tokens over dp, C over tp."""

    dp: int
    tp: int
    reduce: str  # grad_reduce_dtype (meaningful for tp > 1)
    grads: Any = None  # jit(value_and_grad) (e, c, y) -> (loss, (dE, dC)) over global arrays
    rows: Any = None  # jit per-token loss (reduction="none")
    place_tokens: Any = None  # x -> x placed as this setup's tokens (split over dp, replicated over tp)
    c: Any = None  # the classifier placed for this setup
    args: tuple = ()  # (e, c, y) of its own problem (dp * N tokens)
    first_call_s: float | None = None
    errs: dict = dataclasses.field(default_factory=dict)
    times: list = dataclasses.field(default_factory=list)
    note: str | None = None

    @property
    def gpus(self) -> int:
        return self.dp * self.tp

    @property
    def parallel(self) -> str:
        if self.gpus == 1:
            return "none"
        if self.dp == 1:
            return "tp"
        return "dp" if self.tp == 1 else f"dp{self.dp}xtp{self.tp}"

    @property
    def label(self) -> str:
        if self.gpus == 1:
            return "1gpu"
        if self.tp == 1:
            return f"dp{self.dp}"
        return f"tp{self.tp}" if self.dp == 1 else self.parallel

    @property
    def key(self) -> str:
        return f"{self.label}:{self.reduce}" if self.tp > 1 else self.label


def requested_setups(counts: list[int], reduce_dtypes: list[str]) -> list[Setup]:
    out = []
    for k in counts:
        out += [Setup(1, k, rd) for rd in reduce_dtypes]
        out.append(Setup(k, 1, reduce_dtypes[0]))
        if k >= 4 and k % 2 == 0:
            out += [Setup(2, k // 2, rd) for rd in reduce_dtypes]
    return out


def build(s: Setup, c, v: int, devs, placed: dict) -> None:
    """Fill in s's functions and its classifier (placed once per mesh, shared by reduce dtypes)."""
    if s.gpus == 1:
        s.grads = jax.jit(jax.value_and_grad(lambda a, b, t: linear_cross_entropy(a, b, t), argnums=(0, 1)))
        s.rows = jax.jit(lambda a, b, t: linear_cross_entropy(a, b, t, reduction="none"))
        s.place_tokens = lambda x: jax.device_put(x, devs[0])
        s.c = jax.device_put(c, devs[0])
        return
    dp_axis = "dp" if s.dp > 1 else None
    if (s.dp, s.tp) not in placed:
        mesh = make_vocab_parallel_mesh(tp=s.tp, dp=s.dp if s.dp > 1 else None, devices=devs[: s.gpus])
        placed[(s.dp, s.tp)] = (mesh, shard_classifier(c, mesh, axis="tp").c)
    mesh, s.c = placed[(s.dp, s.tp)]
    kw = dict(vocab_size=v, tp_axis="tp", dp_axis=dp_axis, grad_reduce_dtype=s.reduce)
    loss = make_vocab_parallel_loss(mesh, **kw)
    s.grads = jax.jit(jax.value_and_grad(lambda a, b, t: loss(a, b, t), argnums=(0, 1)))
    s.rows = jax.jit(make_vocab_parallel_loss(mesh, reduction="none", **kw))
    tok = NamedSharding(mesh, P(dp_axis))
    s.place_tokens = lambda x: jax.device_put(x, tok)


# ----------------------------------------------------------------------------- agreement
def _on_device0(x, dev0):
    """x gathered whole onto dev0: its distinct shards (split along axis 0 only, as every array
    here) copied there one at a time (device to device) and concatenated."""
    by_start = {}
    for sh in x.addressable_shards:
        by_start.setdefault(sh.index[0].start or 0, sh.data)
    parts = [jax.device_put(by_start[k], dev0) for k in sorted(by_start)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


@jax.jit
def _err_sums(a, b):
    """(||a - b||^2, ||b||^2) summed in float32."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.sum(jnp.square(a - b)), jnp.sum(jnp.square(b))


def _rel_on_device(x, ref, rows: int) -> float:
    num, den = (float(t) for t in _err_sums(x[:rows], ref[:rows]))
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def _gathered(out, dev0):
    loss, (de, dc) = out
    return float(loss), _on_device0(de, dev0), _on_device0(dc, dev0)


def _agreement(out, ref, v: int, dev0) -> dict:
    loss, de, dc = _gathered(out, dev0)
    rloss, rde, rdc = ref
    return {
        "loss_rel_err_vs_ref": abs(loss - rloss) / max(abs(rloss), 1e-30),
        "de_rel_err_vs_ref": _rel_on_device(de, rde, de.shape[0]),
        "dc_rel_err_vs_ref": _rel_on_device(dc, rdc, v),
    }


# ----------------------------------------------------------------------------------- run
class Budget:
    """Wall-clock budget: once spent, no new work starts (0 or less: no limit)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds if seconds > 0 else math.inf

    def spent(self) -> bool:
        return time.monotonic() >= self.end


def _err(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {exc}"[:500]


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3


def _base(name: str, shape, smoke: bool) -> dict:
    n, d, v = shape
    return {
        "shape": name,
        "d": d,
        "v": v,
        "dtype": "float32" if smoke else "bfloat16",
        "subset_rows": min(SUBSET_ROWS, n),
    }


def run_shape(name: str, shape, counts, reduce_dtypes, ref_gpus: int, rounds: int, budget: Budget, smoke: bool):
    """The records of one shape: every setup built, checked, then timed in shuffled rounds."""
    n, d, v = shape
    base = _base(name, shape, smoke)
    dtype, rows_n = jnp.dtype(base["dtype"]), base["subset_rows"]
    devs = jax.devices()
    dev0 = devs[0]
    setups = requested_setups(counts, reduce_dtypes)
    chunk_rows = SMOKE_CHUNK_ROWS if smoke else max(1, F64_CHUNK_BYTES // (8 * d))
    tokens_max = n * max(s.dp for s in setups)

    e_all, c, y_all = _inputs(tokens_max, d, v, dtype)
    t0 = time.perf_counter()
    f64_rows = f64_row_losses(e_all[:rows_n], c, y_all[:rows_n], chunk_rows)
    print(f"{name}: float64 reference of {rows_n} rows, {chunk_rows} C rows a chunk: {time.perf_counter() - t0:.1f} s")

    def problem(s: Setup, m: int):  # (e, c, y) of the m * N-token problem placed for s
        return s.place_tokens(e_all[: m * n]), s.c, s.place_tokens(y_all[: m * n])

    placed: dict = {}

    def ready(s: Setup) -> bool:  # built, with its own problem placed
        if s.grads is None and s.note is None:
            try:
                build(s, c, v, devs, placed)
                s.args = problem(s, s.dp)
            except Exception as exc:
                s.note = _err(exc)
        return s.note is None

    def first_call(s: Setup):
        t = time.perf_counter()
        out = jax.block_until_ready(s.grads(*s.args))
        s.first_call_s = time.perf_counter() - t
        rows = np.asarray(s.rows(s.place_tokens(e_all[:rows_n]), s.c, s.place_tokens(y_all[:rows_n])))
        s.errs["loss_rel_err_vs_f64_subset"] = float(np.linalg.norm(rows - f64_rows) / np.linalg.norm(f64_rows))
        return out

    # The reference: tp=r (or one GPU), doubled while its first call fails.
    ref, ref_out = None, None
    r = ref_gpus
    while r <= len(devs) and ref is None and not budget.spent():
        cand = next((s for s in setups if s.dp == 1 and s.tp == r and s.reduce == reduce_dtypes[0]), None)
        if cand is None:
            cand = Setup(1, r, reduce_dtypes[0])
            setups.insert(0, cand)
        if ready(cand):
            try:
                ref_out = _gathered(first_call(cand), dev0)
                ref = cand
            except Exception as exc:
                cand.note = _err(exc)
        r *= 2
    if ref is not None:
        ref.errs.update(loss_rel_err_vs_ref=0.0, de_rel_err_vs_ref=0.0, dc_rel_err_vs_ref=0.0)

    # First calls and agreement, one token multiple at a time (one reference result held at once).
    for m in sorted({s.dp for s in setups}):
        group = [s for s in setups if s.dp == m and s is not ref]
        ref_m, ref_note = None, (None if ref is not None else "no reference ran")
        if m == 1:
            ref_m, ref_out = ref_out, None  # held for the tokens-multiple-1 group only
        if ref is not None and m > 1 and not budget.spent():
            try:
                ref_m = _gathered(ref.grads(*problem(ref, m)), dev0)
            except Exception as exc:
                ref_note = f"reference on {m} x N tokens: {_err(exc)}"
        for s in group:
            if budget.spent():
                s.note = s.note or "skipped: --budget-s spent before its first call"
                continue
            if not ready(s):
                continue
            try:
                out = first_call(s)
                if ref_m is not None:
                    s.errs.update(_agreement(out, ref_m, v, dev0))
                elif ref_note:
                    s.errs["agreement"] = ref_note
                del out
            except Exception as exc:
                s.note = _err(exc)
        del ref_m

    # Shuffled rounds over the setups whose first call went through.
    live = [s for s in setups if s.note is None and s.first_call_s is not None]
    rng = random.Random(0)
    for _ in range(rounds):
        if budget.spent():
            break
        rng.shuffle(live)
        for s in list(live):
            try:
                s.times.append(_timed(s.grads, *s.args))
            except Exception as exc:
                s.note = _err(exc)
                live.remove(s)

    records = shape_records(base, n, setups, ref)

    # Free this shape's device memory before the next one.
    for s in setups:
        for x in (*s.args, s.c):
            if isinstance(x, jax.Array) and not x.is_deleted():
                x.delete()
    for x in (e_all, c, y_all):
        if not x.is_deleted():
            x.delete()
    return records


def shape_records(base: dict, n: int, setups: list[Setup], ref: Setup | None) -> list[dict]:
    """One record per setup (every key always present; null where not measured)."""
    records = []
    t_ref = float(np.median(ref.times)) if ref is not None and ref.times else None
    for s in sorted(setups, key=lambda s: (s.gpus, s.dp, s.reduce)):
        ms = float(np.median(s.times)) if s.times else None
        eff = None
        if ms is not None and t_ref is not None:
            eff = (ref.gpus * t_ref) * s.dp / (s.gpus * ms)
        note = s.note
        if note is None and s.first_call_s is not None and not s.times:
            note = "skipped: --budget-s spent before the rounds"
        records.append(
            {
                **base,
                "n": s.dp * n,
                "gpus": s.gpus,
                "parallel": s.parallel,
                "dp": s.dp,
                "tp": s.tp,
                "grad_reduce_dtype": s.reduce if s.tp > 1 else None,
                "ms": ms,
                "rounds": len(s.times),
                "efficiency": eff,
                "efficiency_vs": None if ref is None else ref.label,
                "reference": s is ref,
                "loss_rel_err_vs_ref": s.errs.get("loss_rel_err_vs_ref"),
                "de_rel_err_vs_ref": s.errs.get("de_rel_err_vs_ref"),
                "dc_rel_err_vs_ref": s.errs.get("dc_rel_err_vs_ref"),
                "loss_rel_err_vs_f64_subset": s.errs.get("loss_rel_err_vs_f64_subset"),
                "first_call_s": s.first_call_s,
                "note": note or s.errs.get("agreement"),
            }
        )
    return records


def skipped_shape(name: str, shape, counts, reduce_dtypes, smoke: bool) -> list[dict]:
    n, d, v = shape
    setups = requested_setups(counts, reduce_dtypes)
    for s in setups:
        s.note = "skipped: --budget-s spent before this shape"
    return shape_records(_base(name, shape, smoke), n, setups, None)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_record(r: dict) -> None:
    print(
        f"{r['shape']:8s} {r['parallel']:8s} {r.get('grad_reduce_dtype') or '':8s} gpus={r['gpus']} "
        f"{_fmt(r['ms'], '9.2f')} ms  eff {_fmt(r['efficiency'], '.3f')} vs {r.get('efficiency_vs')}  "
        f"loss {_fmt(r.get('loss_rel_err_vs_ref'), '.1e')} dE {_fmt(r.get('de_rel_err_vs_ref'), '.1e')} "
        f"dC {_fmt(r.get('dc_rel_err_vs_ref'), '.1e')}  f64 rows {_fmt(r.get('loss_rel_err_vs_f64_subset'), '.1e')}"
        f"  first call {_fmt(r.get('first_call_s'), '.1f')} s" + (f"  [{r['note']}]" if r.get("note") else ""),
        flush=True,
    )


def _counts(arg: str | None, available: int) -> list[int]:
    if arg is None:
        counts = [2**i for i in range(1, 8) if 2**i <= available]
    else:
        counts = sorted({int(k) for k in arg.split(",")})
    bad = [k for k in counts if not 2 <= k <= available]
    if not counts or bad:
        raise SystemExit(f"--gpu-counts: each count must be in [2, {available}] (the local devices), got {arg!r}")
    return counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="JSON file, rewritten after every shape")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument(
        "--shapes", help=f"comma list of {', '.join(SHAPES)} (default: gemma2,llama3; all with --cpu-smoke)"
    )
    ap.add_argument("--gpu-counts", default=None, help="comma list, e.g. 2,4,8 (default: powers of 2 up to all)")
    ap.add_argument(
        "--reduce-dtypes",
        help="grad_reduce_dtype values of the tp meshes (default input,float32; input with --cpu-smoke)",
    )
    ap.add_argument("--ref-gpus", default=REF_GPUS, help="SHAPE=r,...: reference tp=r instead of one GPU")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting new work after this (0: no limit)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny float32 shapes on CPU host devices")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)
    shapes = SMOKE_SHAPES if args.cpu_smoke else SHAPES
    names = (args.shapes or ("gemma2,llama3,vocab1m" if args.cpu_smoke else "gemma2,llama3")).split(",")
    unknown = [s for s in names if s not in shapes]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {list(shapes)}")
    counts = _counts(args.gpu_counts, len(jax.devices()))
    # float32 inputs (--cpu-smoke) make grad_reduce_dtype "float32" the "input" path again
    reduce_dtypes = (args.reduce_dtypes or ("input" if args.cpu_smoke else "input,float32")).split(",")
    bad = [rd for rd in reduce_dtypes if rd not in ("input", "float32")]
    if bad:
        raise SystemExit(f"--reduce-dtypes: {bad} not among input, float32")
    try:
        ref_gpus = {k: int(r) for k, r in (kv.split("=") for kv in args.ref_gpus.split(",") if kv)}
    except ValueError:
        raise SystemExit(f"--ref-gpus: expected SHAPE=r,... (e.g. vocab1m=2), got {args.ref_gpus!r}") from None
    if any(k not in shapes or r < 1 for k, r in ref_gpus.items()):
        raise SystemExit(f"--ref-gpus: shapes among {list(shapes)}, r >= 1; got {args.ref_gpus!r}")
    # CCE_COMMIT: the checkout's commit where the device copy's git history is not this checkout's.
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = (
        os.environ.get("CCE_COMMIT")
        or subprocess.run(git, capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    )
    meta = {
        "gpu": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "cpu_smoke": args.cpu_smoke,
    }
    print(f"{len(jax.devices())} x {meta['gpu']}; counts {counts}; shapes {names}", flush=True)
    records: list[dict] = []
    for name in names:
        t0 = time.perf_counter()
        if budget.spent():
            recs = skipped_shape(name, shapes[name], counts, reduce_dtypes, args.cpu_smoke)
        else:
            recs = run_shape(
                name, shapes[name], counts, reduce_dtypes, ref_gpus.get(name, 1), args.rounds, budget, args.cpu_smoke
            )
        gc.collect()  # the shape's functions and arrays (deleted above) and compiled programs go now
        jax.clear_caches()
        for r in recs:
            r.update(meta)
            print_record(r)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        records += recs
        if args.out:
            Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
