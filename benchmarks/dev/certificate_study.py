"""How the filter's certificate should be stated (issue 14): per row, per token block, or on the
whole gradient. CPU, NumPy, float64.

    python -m benchmarks.dev.certificate_study [--n 1536] [--v 32768] [--out benchmarks/results/NAME]

For each data set, candidate threshold eps and tolerance tol, and each statement of the
certificate, it reports what is certified, the resulting relative dE and dC error (Frobenius,
against the exact float64 gradient, certified units filtered and the rest exact), the relative
L1 error of the logit gradient, and the work fraction: (kept entries of certified rows + V per row
of the exact ones) / (N V). The per-row rule is the library's (`numpy_backend.RowCertificate`:
bound = |coef_p| dropped mass, lower = kept L1 mass, certified iff bound (1 + margin) <= tol lower);
a token block or the whole gradient sums both sides over its rows and applies the same comparison.
Data generators: tests/conftest.py (the tests' generators, so the tests and this study see the
same rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

from cce_cupy import numpy_backend
from cce_cupy.options import CCEOptions, certificate_margin, row_coefficients

ROOT = pathlib.Path(__file__).resolve().parents[2]
EPS = (2.0**-12, 2.0**-14, 2.0**-16)
TOLS = (2.0**-8, 2.0**-6, 2.0**-4)
STATEMENTS = ("row", "block", "whole")
BLOCK_ROWS = 128
SMALL = 2.0**-12  # the "mass below 2.44e-4"


def passes(bound, lower, tol, margin):
    """The library's comparison (RowCertificate.certified) on any aggregate of rows; margin:
    certificate_margin(V)."""
    return (bound == 0.0) | (bound * (1.0 + margin) <= tol * lower)


def times_c(x, c_t):
    """x @ c for x (rows, V), c_t = c.T contiguous (D, V): OpenBLAS is ~10x faster this way round
    than on (rows, V) @ (V, D) with its long inner dimension."""
    return (c_t @ x.T).T


def study(e, c, t, eps_list=EPS, tols=TOLS, block_rows=BLOCK_ROWS):
    """The study on one problem (e (N, D), c (V, D), targets t (N,), no bias, float64).

    Returns {"data": per-row statistics of the softmax, "kept": list-length statistics per eps,
    "results": one dict per (eps, tol, statement)}. Each result also carries, for the test, the
    absolute dE and dC errors with their bounds, and each certified unit's dropped and kept L1 mass
    (`units`, see _unit).
    """
    e = np.asarray(e, np.float64)
    c = np.asarray(c, np.float64)
    t = np.asarray(t, np.int64)
    n, v = e.shape[0], c.shape[0]
    margin = certificate_margin(v)
    opts = CCEOptions(reduction="sum")
    lse, tgt = numpy_backend.forward(e, c, t, None, opts)
    valid = t != opts.ignore_index
    coef_p, coef_q = (x.astype(np.float64) for x in row_coefficients(np, opts, valid, lse, 1.0))
    c_t = np.ascontiguousarray(c.T)
    tols_up = sorted(tols)
    c_norm = np.sqrt((c * c).sum(1)).max()
    e_norm = np.sqrt((e * e).sum(1))

    de = np.zeros_like(e)
    dc = np.zeros_like(c)
    norm1 = np.zeros(n)
    small_mass, above, p_t = np.zeros(n), np.zeros(n), np.zeros(n)
    per_eps = {
        eps: {
            "bound": np.zeros(n),
            "lower": np.zeros(n),
            "kept": np.zeros(n, np.int64),
            "dropped_l1": np.zeros(n),
            "de_drop": np.zeros_like(e),
            "dc_drop_all": np.zeros_like(c),  # sum over all rows of drop_i^T e_i
            "dc_drop_blocks": {tol: np.zeros_like(c) for tol in tols},  # over the blocks certified at tol
            "dc_drop_rows": {tol: np.zeros_like(c) for tol in tols},  # over the rows certified at tol
        }
        for eps in eps_list
    }
    for r0 in range(0, n, block_rows):
        r1 = min(n, r0 + block_rows)
        e_blk = e[r0:r1]
        z = numpy_backend._raw_logits(e_blk, c, None, 0, v, np.float64)
        g, p, onehot = numpy_backend._grad_block(z, t[r0:r1], lse[r0:r1], coef_p[r0:r1], coef_q[r0:r1], opts, 0, v)
        de[r0:r1] = times_c(g, c_t)
        dc += g.T @ e_blk
        norm1[r0:r1] = np.abs(g).sum(1)
        small_mass[r0:r1] = np.where(p < SMALL, p, 0.0).sum(1)
        above[r0:r1] = (p >= SMALL).sum(1)
        p_t[r0:r1] = np.where(onehot, p, 0.0).sum(1)
        for eps, acc in per_eps.items():
            cert = numpy_backend.RowCertificate(r1 - r0, eps, np.float64)
            cert.add(g, p, onehot)
            acc["bound"][r0:r1] = cert.bound(coef_p[r0:r1], coef_q[r0:r1], opts, v)
            acc["lower"][r0:r1] = cert.lower
            acc["kept"][r0:r1] = cert.kept
            drop = np.where(cert.keep(p, onehot), 0.0, g)  # exact minus filtered gradient
            acc["dropped_l1"][r0:r1] = np.abs(drop).sum(1)
            acc["de_drop"][r0:r1] = times_c(drop, c_t)
            dc_block = drop.T @ e_blk
            acc["dc_drop_all"] += dc_block
            # Rows certified at a smaller tol are certified at every larger one: each row's dC
            # contribution is computed once, at the first tol that certifies it.
            done = np.zeros(r1 - r0, bool)
            for k, tol in enumerate(tols_up):
                if passes(acc["bound"][r0:r1].sum(), acc["lower"][r0:r1].sum(), tol, margin):
                    acc["dc_drop_blocks"][tol] += dc_block
                new = cert.certified(coef_p[r0:r1], coef_q[r0:r1], opts, v, tol) & ~done
                if new.any():
                    part = dc_block if new.all() else drop[new].T @ e_blk[new]
                    for larger in tols_up[k:]:
                        acc["dc_drop_rows"][larger] += part
                done |= new

    de_norm, dc_norm, g_norm1 = np.linalg.norm(de), np.linalg.norm(dc), norm1.sum()
    blocks = [(r0, min(n, r0 + block_rows)) for r0 in range(0, n, block_rows)]
    results, kept_stats = [], {}
    for eps, acc in per_eps.items():
        kept = acc["kept"]
        kept_stats[eps] = {
            "mean": float(kept.mean()),
            "p50": float(np.percentile(kept, 50)),
            "p99": float(np.percentile(kept, 99)),
            "max": int(kept.max()),
        }
        for tol in tols:
            row_ok = passes(acc["bound"], acc["lower"], tol, margin)
            for statement in STATEMENTS:
                if statement == "row":
                    units = [np.array([i]) for i in np.flatnonzero(row_ok)]
                    certified_rows = row_ok
                    dc_err = acc["dc_drop_rows"][tol]
                    unit_fraction = float(row_ok.mean())
                else:
                    spans = blocks if statement == "block" else [(0, n)]
                    ok = [bool(passes(acc["bound"][a:b].sum(), acc["lower"][a:b].sum(), tol, margin)) for a, b in spans]
                    units = [np.arange(a, b) for (a, b), o in zip(spans, ok) if o]
                    certified_rows = np.zeros(n, bool)
                    for rows in units:
                        certified_rows[rows] = True
                    if statement == "block":
                        dc_err = acc["dc_drop_blocks"][tol]
                    else:
                        dc_err = acc["dc_drop_all"] if ok[0] else 0.0
                    unit_fraction = float(np.mean(ok))
                work = (kept[certified_rows].sum() + v * (~certified_rows).sum()) / (n * v)
                results.append(
                    {
                        "eps": eps,
                        "tol": tol,
                        "statement": statement,
                        "certified_units": unit_fraction,
                        "certified_rows": float(certified_rows.mean()),
                        "de_err": float(np.linalg.norm(acc["de_drop"][certified_rows]) / de_norm),
                        "dc_err": float(np.linalg.norm(dc_err) / dc_norm),
                        "g_l1_err": float(acc["dropped_l1"][certified_rows].sum() / g_norm1),
                        "work": float(work),
                        # Absolute errors and the bounds of docs/design.md: ||dE~_i - dE_i|| <= dropped_l1_i
                        # max_j ||c_j|| row by row, ||dC~ - dC||_F <= sum_i dropped_l1_i ||e_i||.
                        "de_err_abs": float(np.linalg.norm(acc["de_drop"][certified_rows])),
                        "de_bound_abs": float(np.linalg.norm(acc["dropped_l1"][certified_rows]) * c_norm),
                        "dc_err_abs": float(np.linalg.norm(dc_err)),
                        "dc_bound_abs": float((acc["dropped_l1"] * e_norm)[certified_rows].sum()),
                        "units": [_unit(acc, rows, norm1) for rows in units],
                    }
                )
    loss = lse - tgt
    data = {
        "n": n,
        "d": e.shape[1],
        "v": v,
        "loss": float(loss.mean()),
        "p_target": float(p_t.mean()),
        "mass_below_2**-12": float(small_mass.mean()),
        "mass_below_2**-12_p10_p90": [float(x) for x in np.percentile(small_mass, [10, 90])],
        "entries_above_2**-12": float(above.mean()),
        "entries_above_2**-12_p10_p90": [float(x) for x in np.percentile(above, [10, 90])],
    }
    return {"data": data, "kept": kept_stats, "results": results}


def _unit(acc, rows, norm1):
    """One certified unit: its measured dropped L1 mass, the certificate's bound and kept mass, and
    the row's whole L1 norm (so dropped_l1 <= bound <= tol lower <= tol norm1 can be checked)."""
    return {
        "rows": len(rows),
        "dropped_l1": float(acc["dropped_l1"][rows].sum()),
        "bound": float(acc["bound"][rows].sum()),
        "lower": float(acc["lower"][rows].sum()),
        "norm1": float(norm1[rows].sum()),
    }


def datasets(n, d, v, seed=0):
    """The study's data sets by name: (e, c, t), float64."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_lm_like_problem, make_problem, make_sharp_problem, make_zipf_problem

    def plain(peaked):
        e, c, t, _ = make_problem(n, d, v, "float64", peaked=peaked, ignore_frac=0.0, seed=seed)
        return e, c, t

    return {
        "sharp": lambda: make_sharp_problem(n, d, v, "float64", seed=seed),
        "peaked": lambda: plain(True),
        "uniform": lambda: plain(False),
        # The long-tailed set: Zipf(1) prior, noise 1 (~37% of the mass below 2**-12), targets
        # drawn from Zipf(1.6) so that the loss is ~4 nats (from the prior itself it is ~8).
        "zipf": lambda: make_zipf_problem(n, d, v, "float64", s=1.0, noise=1.0, target_s=1.6, seed=seed),
        "lm_like": lambda: make_lm_like_problem(n, d, v, "float64", seed=seed),
    }


def _fmt(x):
    return "2^%d" % round(np.log2(x))


def markdown(record) -> str:
    lines = [
        "# Certificate study (issue 14): per row, per token block, whole gradient",
        "",
        f"{record['date']}, commit {record['commit']}, CPU float64, `python -m benchmarks.dev.certificate_study`; "
        f"N={record['parameters']['n']}, D={record['parameters']['d']}, V={record['parameters']['v']}, "
        f"token block {record['parameters']['block_rows']} rows.",
        "",
        "Data (means over rows; p10-p90 in brackets):",
        "",
        "| data | loss (nats) | p_target | mass below 2^-12 | entries above 2^-12 |",
        "|---|---|---|---|---|",
    ]
    for name, res in record["datasets"].items():
        dd = res["data"]
        m10, m90 = dd["mass_below_2**-12_p10_p90"]
        a10, a90 = dd["entries_above_2**-12_p10_p90"]
        lines.append(
            f"| {name} | {dd['loss']:.2f} | {dd['p_target']:.3f} | {dd['mass_below_2**-12']:.3f} "
            f"({m10:.3f}-{m90:.3f}) | {dd['entries_above_2**-12']:.0f} ({a10:.0f}-{a90:.0f}) |"
        )
    lines += ["", "Kept entries per row (the list length K a row needs): mean / p99 / max", ""]
    lines += ["| data | " + " | ".join(f"eps={_fmt(x)}" for x in record["parameters"]["eps"]) + " |"]
    lines += ["|---|" + "---|" * len(record["parameters"]["eps"])]
    for name, res in record["datasets"].items():
        cells = [f"{k['mean']:.0f} / {k['p99']:.0f} / {k['max']}" for k in res["kept"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each statement at each (eps, tol): certified = fraction of units (rows, 128-row blocks, or the "
        "whole gradient: 0/1) certified; rows = fraction of rows inside certified units; dE, dC = "
        "relative Frobenius error of the result (certified units filtered, the rest exact); g L1 = "
        "relative L1 error of the logit gradient; work = (kept entries of certified rows + V per exact "
        "row) / (N V).",
        "",
        "| data | eps | tol | statement | certified | rows | dE err | dC err | g L1 err | work |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in record["datasets"].items():
        for r in res["results"]:
            lines.append(
                f"| {name} | {_fmt(r['eps'])} | {_fmt(r['tol'])} | {r['statement']} | {r['certified_units']:.3f} "
                f"| {r['certified_rows']:.3f} | {r['de_err']:.1e} | {r['dc_err']:.1e} | {r['g_l1_err']:.1e} "
                f"| {r['work']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--v", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu-20261130-certificate-study"))
    args = ap.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    record = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "parameters": {
            "n": args.n,
            "d": args.d,
            "v": args.v,
            "seed": args.seed,
            "block_rows": BLOCK_ROWS,
            "eps": list(EPS),
            "tols": list(TOLS),
            "certificate_margin": certificate_margin(args.v),
            "options": "reduction='sum', no smoothing, softcap or z-loss (coef_p = coef_q = 1)",
        },
        "datasets": {},
    }
    for name, make in datasets(args.n, args.d, args.v, args.seed).items():
        start = time.perf_counter()
        res = study(*make())
        for r in res["results"]:
            del r["units"]
        res["kept"] = {str(k): val for k, val in res["kept"].items()}
        record["datasets"][name] = res
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    out = pathlib.Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
