"""Kernel-level check and timing through the cce_cupy.cuda launchers, for kernel development on the device.

Correctness: every dtype x option combination on small odd shapes against a dense float64
reference, outputs poisoned with NaN first. Timing: forward and backward at model shapes next to
cuBLAS (cupy.matmul) GEMMs of the same shape. Usage: python -m benchmarks.dev.kernel_check [--time]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import cupy as cp
import ml_dtypes
import numpy as np

from cce_cupy.cuda import backward as cuda_backward
from cce_cupy.cuda import device, plan
from cce_cupy.cuda import forward as cuda_forward
from cce_cupy.options import CCEOptions, grad_dtype, row_coefficients

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def dense_reference(e, c, t, bias, o: CCEOptions, coef_p, coef_q):
    z = e.astype(np.float64) @ c.astype(np.float64).T
    if bias is not None:
        z += bias.astype(np.float64)
    y = o.softcap * np.tanh(z / o.softcap) if o.softcap else z
    m = y.max(1, keepdims=True)
    lse = (m + np.log(np.exp(y - m).sum(1, keepdims=True)))[:, 0]
    n, v = y.shape
    valid = t != o.ignore_index
    ls = o.label_smoothing
    yt = np.where(valid, y[np.arange(n), np.clip(t, 0, v - 1)], 0.0)
    tgt = np.where(valid, (1 - ls) * yt + ls / v * y.sum(1), 0.0)
    p = np.exp(y - lse[:, None])
    q = np.full_like(y, ls / v)
    q[np.arange(n)[valid], t[valid]] += 1 - ls
    g = coef_p[:, None] * p - coef_q[:, None] * q
    if o.softcap:
        g *= 1 - (y / o.softcap) ** 2
    de = g @ c.astype(np.float64)
    dc = g.T @ e.astype(np.float64)
    return lse, tgt, de, dc, g.sum(0)


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (den if den > 0 else 1.0))


def check_case(n, d, v, dtype, o: CCEOptions, with_bias, peaked, rng, idx_dtype=np.int64):
    npdt = DTYPES[dtype]
    e = rng.standard_normal((n, d)).astype(np.float32)
    c = (rng.standard_normal((v, d)) / np.sqrt(d)).astype(np.float32)
    t = rng.integers(0, v, n).astype(idx_dtype)
    t[rng.random(n) < 0.2] = o.ignore_index
    if peaked:  # the target logit log(V) + 3 above the typical one: p_target ~ 0.95
        ok = t >= 0
        ct = c[t[ok]]
        e[ok] += (np.log(v) + 3.0) * ct / (ct * ct).sum(1, keepdims=True)
    bias = (0.1 * rng.standard_normal(v)).astype(np.float32) if with_bias else None
    e, c = e.astype(npdt), c.astype(npdt)
    bias = bias.astype(npdt) if with_bias else None
    ge, gc, gt = cp.asarray(e), cp.asarray(c), cp.asarray(t)
    gb = cp.asarray(bias) if with_bias else None
    lse = cp.full(n, cp.nan, cp.float32)
    tgt = cp.full(n, cp.nan, cp.float32)
    cuda_forward.launch_forward(ge, gc, gt, gb, o, lse, tgt)
    valid = gt != o.ignore_index
    gl = cp.asarray(rng.random(n).astype(np.float32)) if o.reduction == "none" else 1.0
    cpp, cq = row_coefficients(cp, o, valid, lse, gl)
    gdt = grad_dtype(ge.dtype, o)
    de = cp.full((n, d), cp.nan, gdt)
    dc = cp.full((v, d), cp.nan, gdt)
    db = cp.full((v,), cp.nan, gdt) if with_bias else None
    cuda_backward.launch_backward(ge, gc, gt, gb, o, lse, cpp, cq, de, dc, db)
    cp.cuda.runtime.deviceSynchronize()
    r_lse, r_tgt, r_de, r_dc, r_db = dense_reference(
        e.astype(np.float64),
        c.astype(np.float64),
        t,
        None if bias is None else bias.astype(np.float64),
        o,
        cp.asnumpy(cpp).astype(np.float64),
        cp.asnumpy(cq).astype(np.float64),
    )
    errs = {
        "lse": rel(cp.asnumpy(lse), r_lse),
        "tgt": rel(cp.asnumpy(tgt), r_tgt),
        "de": rel(cp.asnumpy(de).astype(np.float64), r_de),
        "dc": rel(cp.asnumpy(dc).astype(np.float64), r_dc),
    }
    if with_bias:
        errs["db"] = rel(cp.asnumpy(db).astype(np.float64), r_db)
    return errs


def correctness() -> bool:
    rng = np.random.default_rng(0)
    all_ok = True
    opts_list = [
        CCEOptions(),
        CCEOptions(softcap=30.0),
        CCEOptions(label_smoothing=0.1, z_loss=1e-3, reduction="none"),
        CCEOptions(grad_dtype="float32", reduction="sum"),
        CCEOptions(filter_eps="auto"),
    ]
    shapes = [(7, 13, 129), (130, 64, 300), (257, 136, 1000), (1, 8, 1), (300, 2304 // 8, 2500)]
    for dtype in DTYPES:
        tol = 1e-5 if dtype == "float32" else 1e-2
        for o in opts_list:
            for n, d, v in shapes:
                for with_bias in (False, True):
                    peaked = o.filter_eps is not None
                    errs = check_case(n, d, v, dtype, o, with_bias, peaked, rng)
                    bad = {k: x for k, x in errs.items() if not (x <= tol)}
                    ok = not bad
                    all_ok &= ok
                    if not ok or (n, d, v) == (300, 288, 2500):
                        print(
                            ("OK  " if ok else "FAIL"),
                            dtype,
                            o,
                            (n, d, v),
                            "bias" if with_bias else "",
                            {k: f"{x:.2e}" for k, x in errs.items()},
                            flush=True,
                        )
    return all_ok


def cuda_time(fn, repeats=5):
    fn()
    cp.cuda.runtime.deviceSynchronize()
    times = []
    for _ in range(repeats):
        s, t = cp.cuda.Event(), cp.cuda.Event()
        s.record()
        fn()
        t.record()
        t.synchronize()
        times.append(cp.cuda.get_elapsed_time(s, t))
    return float(np.median(times))


def timing(shapes, repeats):
    rows = []
    for name, (n, d, v) in shapes.items():
        bf = ml_dtypes.bfloat16
        e = (cp.random.standard_normal((n, d), dtype=cp.float32)).astype(bf)
        c = (cp.random.standard_normal((v, d), dtype=cp.float32) / np.sqrt(d)).astype(bf)
        t = cp.random.randint(0, v, n).astype(cp.int64)
        o = CCEOptions()
        lse = cp.empty(n, cp.float32)
        tgt = cp.empty(n, cp.float32)
        fwd = lambda: cuda_forward.launch_forward(e, c, t, None, o, lse, tgt)  # noqa: E731
        ms_fwd = cuda_time(fwd, repeats)
        valid = t != o.ignore_index
        cpp, cq = row_coefficients(cp, o, valid, lse, 1.0)
        de = cp.empty((n, d), bf)
        dc = cp.empty((v, d), bf)
        scratch = cp.empty(plan.backward_scratch_nbytes(n, v, d, e.dtype, o), cp.uint8)
        bwd = lambda: cuda_backward.launch_backward(e, c, t, None, o, lse, cpp, cq, de, dc, None, scratch)  # noqa: E731
        ms_bwd = cuda_time(bwd, repeats)
        of = CCEOptions(filter_eps="auto")
        scratch_f = cp.empty(plan.backward_scratch_nbytes(n, v, d, e.dtype, of), cp.uint8)
        ms_bwd_filter_uniform = cuda_time(
            lambda: cuda_backward.launch_backward(e, c, t, None, of, lse, cpp, cq, de, dc, None, scratch_f), repeats
        )
        logits = cp.empty((n, v), bf)
        ms_mm = cuda_time(lambda: cp.matmul(e, c.T, out=logits), repeats)
        logits = None  # 4 GB at gemma2: freed before the next shape
        cp.get_default_memory_pool().free_all_blocks()
        flops = 2.0 * n * d * v
        row = {
            "shape": name,
            "N": n,
            "D": d,
            "V": v,
            "fwd_ms": ms_fwd,
            "bwd_ms": ms_bwd,
            "bwd_filter_uniform_ms": ms_bwd_filter_uniform,
            "cublas_fwd_ms": ms_mm,
            "fwd_tflops": flops / ms_fwd / 1e9,
            "bwd_tflops": 3 * flops / ms_bwd / 1e9,
            "fwd_over_cublas": ms_fwd / ms_mm,
            "fwdbwd_over_4gemm": (ms_fwd + ms_bwd) / (4 * ms_mm),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        cp.get_default_memory_pool().free_all_blocks()
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kernels", default="auto,sm80", help="kernel families to run, comma-separated")
    args = ap.parse_args()
    print(cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), flush=True)
    ok = True
    for family in args.kernels.split(","):
        device.KERNELS = family
        print(f"--- kernels: {family}", flush=True)
        if not args.no_check:
            t0 = time.time()
            # Small scratch budgets, so the shapes below run several row parts and vocabulary chunks.
            budgets = plan.GRAD_CHUNK_BYTES, plan.DE_ACC_BYTES
            plan.GRAD_CHUNK_BYTES, plan.DE_ACC_BYTES = 256 << 10, 256 << 10
            fam_ok = correctness()
            plan.GRAD_CHUNK_BYTES, plan.DE_ACC_BYTES = budgets
            ok &= fam_ok
            print("correctness", family, "PASS" if fam_ok else "FAIL", f"{time.time() - t0:.0f}s", flush=True)
        if args.time:
            timing({"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}, args.repeats)
    sys.exit(0 if ok else 1)
