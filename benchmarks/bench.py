"""Fused linear cross-entropy benchmark: ours against the cuBLAS floor and every peer.

    python benchmarks/bench.py --out DIR [--shapes gemma2,llama3] [--providers ...]
        [--modes fwd,bwd,fwd_bwd] [--data uniform,peaked,long_tailed,trained_lm] [--trained-lm PATH]
        [--dtype bfloat16] [--label NAME] [--budget-s 420] [--repeats 5] [--sweep-v] [--cpu-smoke]

Writes DIR/<gpu>-<yyyymmdd>-<label>.json (a list of records, format in benchmarks/README.md)
after every (shape, data) case, so a run cut short keeps what it measured, and the Markdown
table DIR/<same>.md, which is also printed. Each provider runs in try/except: a failure becomes
a record with ms null and the error in `note`, and the run goes on. Work left when --budget-s is
spent is skipped and listed at the end.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before anything imports jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: cce_cupy, benchmarks

from benchmarks import providers as P  # noqa: E402

SHAPES = P.SHAPES
SWEEP_V = {f"v{v // 1000}k": (8192, 2304, v) for v in (32000, 64000, 128000, 256000)}
SMOKE_SHAPES = {"tiny": (64, 32, 1000)}
MODES = ("fwd", "bwd", "fwd_bwd")
DATA = ("uniform", "peaked", "long_tailed", "trained_lm")
# trained_lm runs once, at the saved states' own (N, D, V), under this shape name.
TRAINED_LM = "trained_lm"
RECORD_KEYS = (
    "gpu",
    "date",
    "versions",
    "shape",
    "N",
    "D",
    "V",
    "dtype",
    "data",
    "provider",
    "mode",
    "filter",
    "ms",
    "extra_mib",
    "rel_err_loss",
    "rel_err_de",
    "rel_err_dc",
    "note",
    "memory_budget",
    "certified_fraction",
)
DISTS = (
    "numpy",
    "cupy-cuda13x",
    "ml_dtypes",
    "torch",
    "triton",
    "jax",
    "jaxlib",
    "jax-cuda13-plugin",
    "optax",
    "cut-cross-entropy",
    "liger-kernel",
    "jax-cce",
    "quack-kernels",
    "nvidia-cutlass-dsl",
    "cce-cupy",
)


def log(*a) -> None:
    print(*a, flush=True)


# ------------------------------------------------------------------------------ run metadata
def versions(backend: str) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for d in DISTS:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = None
    if backend == "cupy":
        try:
            import cupy

            out["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            out["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        except Exception:  # noqa: BLE001
            pass
    out["cce_cupy_commit"] = _git_head()
    return out


def _git_head() -> str | None:
    """The checked-out commit: $CCE_CUPY_COMMIT when set (the device's copy of .git can lag the
    working tree it was sent), else read from .git without running git (None if there is none)."""
    if os.environ.get("CCE_CUPY_COMMIT"):
        return os.environ["CCE_CUPY_COMMIT"]
    try:
        git = Path(__file__).resolve().parent.parent / ".git"
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except Exception:  # noqa: BLE001
        pass
    return None


def gpu_name(backend: str) -> str:
    if backend == "cupy":
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    return f"cpu-numpy-{platform.machine()}"


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9._-]", "", s.lower().replace(" ", "-"))


# ----------------------------------------------------------------------------------- records
def record(
    meta: dict,
    p: P.Problem,
    provider: str,
    mode: str,
    flt: bool,
    ms=None,
    extra=None,
    errs=(None, None, None),
    note: str = "",
    memory_budget: int | None = None,
    certified_fraction: float | None = None,
) -> dict:
    r = dict(meta)
    r.update(
        shape=p.shape,
        N=p.n,
        D=p.d,
        V=p.v,
        dtype=p.dtype,
        data=p.data,
        provider=provider,
        mode=mode,
        filter=bool(flt),
        ms=None if ms is None else round(float(ms), 4),
        extra_mib=None if extra is None else round(extra / P.MIB, 2),
        rel_err_loss=_r(errs[0]),
        rel_err_de=_r(errs[1]),
        rel_err_dc=_r(errs[2]),
        note=note,
        memory_budget=memory_budget,  # bytes, for ours under a memory budget; None: the lean path
        certified_fraction=_r(certified_fraction),  # ours filtered, bwd and fwd_bwd: rows certified
    )
    assert tuple(r) == RECORD_KEYS, tuple(r)
    return r


def _r(x):
    return None if x is None else float(f"{float(x):.4g}")


def errors_of(p: P.Problem, mode: str, out) -> tuple:
    if out is None:
        return (None, None, None)
    if mode == "fwd":
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return (P.rel_err(p, loss, "loss"), None, None)
    if mode == "bwd":
        de, dc = out[0], out[1]
        return (None, P.rel_err(p, de, "de"), P.rel_err(p, dc, "dc"))
    loss, de, dc = out[0], out[1], out[2]
    return (P.rel_err(p, loss, "loss"), P.rel_err(p, de, "de"), P.rel_err(p, dc, "dc"))


def run_provider(key: str, p: P.Problem, modes: list[str], args, meta: dict) -> list[dict]:
    """Every requested mode of one provider variant; never raises."""
    name, flt = P.provider_identity(key)
    recs: list[dict] = []
    prov = None
    try:
        prov = P.make_provider(key, p)
        t0 = time.time()
        prov.setup()
        log(f"    setup {time.time() - t0:.1f} s")
        if key in P.GEMM_PROVIDERS:
            want = list(prov.modes)
        else:
            want = [m for m in MODES if m in modes]
        need = list(want)
        if "bwd" in want and not prov.bwd_direct:  # derived: needs fwd and fwd_bwd
            need = ["fwd", "fwd_bwd", "bwd"]
        got: dict[str, dict] = {}
        for mode in need:
            try:
                if mode == "bwd" and not prov.bwd_direct:
                    f, fb = got.get("fwd"), got.get("fwd_bwd")
                    if not (f and fb and f["ms"] is not None and fb["ms"] is not None):
                        raise RuntimeError("bwd is derived from fwd and fwd_bwd, which failed")
                    diff = fb["ms"] - f["ms"]
                    got["bwd"] = dict(  # timing noise can exceed a tiny backward: no negative times
                        ms=diff if diff >= 0 else None,
                        extra=fb["extra"],
                        errs=(None, None, None),
                        note="bwd = fwd_bwd - fwd; extra_mib is fwd_bwd's"
                        + ("" if diff >= 0 else f"; not measurable: fwd_bwd - fwd = {diff:.3f} ms < 0 (noise)"),
                    )
                    continue
                t0 = time.time()
                if key not in P.GEMM_PROVIDERS:
                    warm = prov.call(mode)  # compile / autotune / first-touch, untimed
                    P.Timer(prov.timer).sync()
                    P.block(warm)
                    del warm
                mem_note = ""
                try:
                    extra, out = prov.measure_memory(mode)
                except Exception as ex:  # noqa: BLE001 - time it anyway, without the memory figure
                    mem_note = f"memory not measured: {type(ex).__name__}: {ex}"[:200]
                    log(f"    {mode}: {mem_note}")
                    extra, out = None, prov.call(mode)
                    P.Timer(prov.timer).sync()
                errs = errors_of(p, mode, out)
                del out
                # One untimed call right before the timed ones for every provider alike: the memory
                # and error checks above leave the GPU idle long enough for its clocks to drop.
                ms = prov.time(mode, args.repeats, warmup=1)
                got[mode] = dict(ms=ms, extra=extra, errs=errs, note=mem_note)
                log(
                    f"    {mode:13s} {ms:9.3f} ms  extra {_fmt_mib(extra)}  err {_fmt_errs(errs)}"
                    f"  ({time.time() - t0:.1f} s)"
                )
            except Exception as ex:  # noqa: BLE001
                got[mode] = dict(
                    ms=None,
                    extra=None,
                    errs=(None, None, None),
                    note=f"error: {type(ex).__name__}: {ex}"[:500],
                )
                log(f"    {mode}: FAILED {type(ex).__name__}: {ex}")
                traceback.print_exc(limit=3)
                P.free_device_memory()
            if args.budget_s and time.time() - args.t_start > args.budget_s and mode != need[-1]:
                log("    budget spent: skipping this provider's other modes")
                args.skipped.append(f"{p.shape}/{p.data}/{key}: modes after {mode}")
                break
        timed_grads = any(got.get(m, {}).get("ms") is not None for m in ("bwd", "fwd_bwd"))
        cert, cert_note = measure_certified_fraction(prov) if flt and timed_grads else (None, "")
        for mode in want:
            if mode in got:
                g = got[mode]
                grad_mode = mode in ("bwd", "fwd_bwd")
                note = "; ".join(x for x in (prov.note, g["note"], cert_note if grad_mode else "") if x)
                budget = getattr(prov, "opts", {}).get("memory_budget")
                recs.append(
                    record(
                        meta,
                        p,
                        name,
                        mode,
                        flt,
                        g["ms"],
                        g["extra"],
                        g["errs"],
                        note,
                        budget,
                        cert if grad_mode else None,
                    )
                )
    except Exception as ex:  # noqa: BLE001 - setup failed: one error record per mode
        msg = f"error: {type(ex).__name__}: {ex}"[:500]
        log(f"    FAILED {msg}")
        want = list(P.GEMM_MODES[key]) if key in P.GEMM_PROVIDERS else [m for m in MODES if m in modes]
        recs = [record(meta, p, name, m, flt, note=msg) for m in want]
    finally:
        if prov is not None:
            try:
                prov.teardown()
            except Exception:  # noqa: BLE001
                pass
        del prov
        P.free_device_memory()
    return recs


def measure_certified_fraction(prov) -> tuple[float | None, str]:
    """(fraction of rows certified, note) of a filtered provider, from one untimed call; never raises."""
    try:
        frac = prov.certified_fraction()
        P.Timer(prov.timer).sync()
    except Exception as ex:  # noqa: BLE001 - the timings stand without it
        log(f"    certified_fraction: FAILED {type(ex).__name__}: {ex}")
        return None, f"certified_fraction not measured: {type(ex).__name__}: {ex}"[:200]
    if frac is not None:
        log(f"    certified rows {frac:.4f}")
    return frac, ""


def _forget_filter_history(p: P.Problem) -> None:
    if p.backend == "cupy":
        from cce_cupy.cuda.filter_history import HISTORY

        HISTORY.clear()


def paired_rounds(p: P.Problem, rounds: int) -> list[dict]:
    """ours and its cuBLAS floor timed in alternating rounds, one call of each a round (the order
    flipped every round): clock and temperature drift over a run of minutes then hits both alike,
    where the main table times the floor minutes before ours. fwd against E @ Cᵀ, fwd_bwd against
    the four GEMMs, fwd_bwd_budget (ours with memory_budget=BUDGET_BYTES; fwd_bwd_budget_logits:
    the bf16 logits' bytes, torch.compile's extra memory) and fwd_bwd_filter (ours
    with filter_eps="auto") against the three GEMMs (gemm_bwd_sum), and filter_vs_exact: the
    filtered call's "floor" is our exact call (issue 14: at most 1.05x where rows do not certify):
    filter_vs_exact as a training loop sees it (after a call that certified under half its rows,
    15 of 16 calls run exact), filter_probe_vs_exact with every call running the filter. The ratio
    is the median of the per-round ratios."""
    cub, ours = P.make_provider("cublas", p), P.make_provider("ours", p)
    budgeted, filtered = P.make_provider("ours_budget", p), P.make_provider("ours_filter", p)
    tight = P.make_provider("ours_budget_logits", p)
    timer = P.Timer("cupy")
    out = []
    try:
        cub.setup()
        ours.setup()
        budgeted.setup()
        tight.setup()
        filtered.setup()
        cases = {
            "fwd": (cub._fwd, ours.fwd),
            "fwd_bwd": (lambda: (cub._fwd(), cub._bwd()), ours.fwd_bwd),
            # the memory-budgeted path against the three GEMMs of a loss that keeps its logits
            "fwd_bwd_budget": (cub._bwd, budgeted.fwd_bwd),
            # ... with a budget of the bf16 logits' bytes (torch.compile's extra memory)
            "fwd_bwd_budget_logits": (cub._bwd, tight.fwd_bwd),
            "fwd_bwd_filter": (cub._bwd, filtered.fwd_bwd),
            "filter_vs_exact": (ours.fwd_bwd, filtered.fwd_bwd),
            # every filtered call runs the filter (no history: cce_cupy.cuda.filter_history)
            "filter_probe_vs_exact": (ours.fwd_bwd, lambda: (_forget_filter_history(p), filtered.fwd_bwd())),
        }
        for mode, (floor, mine) in cases.items():
            floor()
            mine()
            timer.sync()
            times: dict[str, list[float]] = {"floor": [], "ours": []}
            for r in range(rounds):
                order = [("floor", floor), ("ours", mine)]
                for name, fn in order if r % 2 == 0 else order[::-1]:
                    times[name].append(timer.time(fn, 1, warmup=0))
            ratios = [o / f for o, f in zip(times["ours"], times["floor"])]
            out.append(
                dict(
                    shape=p.shape,
                    data=p.data,
                    mode=mode,
                    rounds=rounds,
                    floor_ms=round(P.median(times["floor"]), 4),
                    ours_ms=round(P.median(times["ours"]), 4),
                    ratio=round(P.median(ratios), 4),
                    ratio_min=round(min(ratios), 4),
                    ratio_max=round(max(ratios), 4),
                )
            )
            log(
                f"  paired {mode}: floor {out[-1]['floor_ms']:.3f} ms, ours {out[-1]['ours_ms']:.3f} ms, "
                f"ratio {out[-1]['ratio']:.3f} [{out[-1]['ratio_min']:.3f}-{out[-1]['ratio_max']:.3f}]"
            )
    except Exception as ex:  # noqa: BLE001 - the main table stands without it
        log(f"  paired rounds FAILED: {type(ex).__name__}: {ex}")
    finally:
        for prov in (cub, ours, budgeted, tight, filtered):
            try:
                prov.teardown()
            except Exception:  # noqa: BLE001
                pass
        P.free_device_memory()
    return out


def paired_lines(paired: list[dict]) -> list[str]:
    if not paired:
        return []
    lines = [
        "",
        "## Paired rounds: ours and its cuBLAS floor alternating (see paired_rounds)",
        "",
        "| shape | data | mode | rounds | floor ms | ours ms | ratio (median) | min-max |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for q in paired:
        lines.append(
            f"| {q['shape']} | {q['data']} | {q['mode']} | {q['rounds']} | {q['floor_ms']:.3f} "
            f"| {q['ours_ms']:.3f} | {q['ratio']:.3f} | {q['ratio_min']:.3f}-{q['ratio_max']:.3f} |"
        )
    return lines


def _fmt_mib(b) -> str:
    return "-" if b is None else f"{b / P.MIB:.1f} MiB"


def _fmt_errs(e) -> str:
    return " ".join("-" if x is None else f"{x:.1e}" for x in e)


# ----------------------------------------------------------------------------------- reports
def floors(records: list[dict]) -> dict:
    """(shape, data) -> {'gemm_fwd': ms, 'gemm_bwd_sum': ms}."""
    out: dict = {}
    for r in records:
        if r["provider"] == "cublas" and r["ms"] is not None:
            out.setdefault((r["shape"], r["data"]), {})[r["mode"]] = r["ms"]
    return out


def ratio(r: dict, fl: dict) -> float | None:
    f = fl.get((r["shape"], r["data"]), {})
    if r["ms"] is None:
        return None
    if r["mode"] == "fwd" and f.get("gemm_fwd"):
        return r["ms"] / f["gemm_fwd"]
    if r["mode"] == "bwd" and f.get("gemm_bwd_sum"):
        return r["ms"] / f["gemm_bwd_sum"]
    if r["mode"] == "fwd_bwd" and f.get("gemm_fwd") and f.get("gemm_bwd_sum"):
        return r["ms"] / (f["gemm_fwd"] + f["gemm_bwd_sum"])
    return None


def _cell(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(records: list[dict], skipped: list[str], paired: list[dict] | None = None) -> str:
    fl = floors(records)
    lines = []
    if records:
        r0 = records[0]
        vers = ", ".join(f"{k} {v}" for k, v in r0["versions"].items() if v is not None)
        lines += [
            f"# {r0['gpu']}, {r0['date']}, {r0['dtype']}",
            "",
            f"Versions: {vers}",
            "",
            "× floor: fwd / cuBLAS E@Cᵀ; bwd / the 3 backward GEMMs; fwd_bwd / all 4 GEMMs (same shape, data and run).",
            "",
        ]
    lines += [
        "| shape | data | provider | mode | filter | budget | ms | × floor | extra MiB "
        "| err loss | err dE | err dC | certified | note |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        note = (
            r["note"]
            if r["ms"] is None
            else ("derived: fwd_bwd - fwd" if "bwd = fwd_bwd - fwd;" in r["note"] and r["mode"] == "bwd" else "")
        )
        lines.append(
            f"| {r['shape']} | {r['data']} | {r['provider']} | {r['mode']} "
            f"| {'yes' if r['filter'] else 'no'} | {_fmt_budget(r.get('memory_budget'))} "
            f"| {_cell(r['ms'], '.3f')} | {_cell(ratio(r, fl), '.3f')} | {_cell(r['extra_mib'], '.1f')} "
            f"| {_cell(r['rel_err_loss'], '.2e')} | {_cell(r['rel_err_de'], '.2e')} "
            f"| {_cell(r['rel_err_dc'], '.2e')} | {_cell(r.get('certified_fraction'), '.1%')} "
            f"| {note.replace('|', '/')[:120]} |"
        )
    lines += ["", "## Ratios the bars use", ""]
    lines += ratio_lines(records, fl) or ["(no cuBLAS floor or no ours records)"]
    lines += paired_lines(paired or [])
    if skipped:
        lines += ["", "## Skipped (budget, or a peer not installed)", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def _fmt_budget(b) -> str:
    return "lean" if b is None else f"{b / P.MIB:.0f} MiB"


def ratio_lines(records: list[dict], fl: dict) -> list[str]:
    out = []
    # The lean records (memory_budget None) by their usual key; the budgeted ones apart.
    by = {
        (r["shape"], r["data"], r["provider"], r["mode"], r["filter"]): r["ms"]
        for r in records
        if not r.get("memory_budget")
    }
    budgeted = [r for r in records if r.get("memory_budget") and r["mode"] == "fwd_bwd" and r["ms"]]
    for (shape, data), f in fl.items():
        g4 = (f.get("gemm_fwd") or 0) + (f.get("gemm_bwd_sum") or 0)
        for prov, flt in (("ours", False), ("ours_deterministic", False), ("ours", True)):
            tag = prov + (" filter" if flt else "")
            fwd = by.get((shape, data, prov, "fwd", flt))
            fb = by.get((shape, data, prov, "fwd_bwd", flt))
            if fwd and f.get("gemm_fwd") and not flt:
                out.append(f"- {shape}/{data}: {tag} fwd / cuBLAS gemm_fwd = {fwd / f['gemm_fwd']:.3f}")
            if fb and g4 and f.get("gemm_fwd") and f.get("gemm_bwd_sum"):
                out.append(f"- {shape}/{data}: {tag} fwd_bwd / (gemm_fwd + gemm_bwd_sum) = {fb / g4:.3f}")
        ours_fb = by.get((shape, data, "ours", "fwd_bwd", False))
        ours_ffb = by.get((shape, data, "ours", "fwd_bwd", True))
        for peer, flt in (("torch_compile", False), ("apple_cce", False), ("apple_cce", True)):
            pfb = by.get((shape, data, peer, "fwd_bwd", flt))
            if pfb and ours_fb:
                out.append(
                    f"- {shape}/{data}: ours fwd_bwd / {peer}{' filter' if flt else ''} fwd_bwd = {ours_fb / pfb:.3f}"
                )
            if pfb and ours_ffb and peer == "torch_compile":
                out.append(f"- {shape}/{data}: ours filter fwd_bwd / torch_compile fwd_bwd = {ours_ffb / pfb:.3f}")
        for r in (r for r in budgeted if (r["shape"], r["data"]) == (shape, data)):
            used = _cell(r["extra_mib"], ".0f")
            tag = f"{r['provider']}, memory_budget {_fmt_budget(r['memory_budget'])} ({used} MiB used)"
            if f.get("gemm_bwd_sum"):
                out.append(
                    f"- {shape}/{data}: {tag} fwd_bwd / the 3 GEMMs (gemm_bwd_sum) = {r['ms'] / f['gemm_bwd_sum']:.3f}"
                )
            for peer in ("torch_compile", "quack", "liger", "optax"):
                pfb = by.get((shape, data, peer, "fwd_bwd", False))
                if pfb:
                    out.append(f"- {shape}/{data}: {tag} fwd_bwd / {peer} fwd_bwd = {r['ms'] / pfb:.3f}")
        jb = by.get((shape, data, "jax_bindings", "fwd_bwd", False))
        if jb and ours_fb:
            out.append(f"- {shape}/{data}: jax_bindings fwd_bwd / ours (CuPy) fwd_bwd = {jb / ours_fb:.3f}")
    return out


# -------------------------------------------------------------------------------------- main
def parse_shapes(spec: str | None, sweep: bool, smoke: bool) -> dict:
    if smoke and spec is None:
        return dict(SMOKE_SHAPES)
    shapes = {}
    if spec is None:
        spec = "" if sweep else "gemma2,llama3"
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in SHAPES:
            shapes[item] = SHAPES[item]
        elif item in SMOKE_SHAPES:
            shapes[item] = SMOKE_SHAPES[item]
        elif "=" in item:  # name=NxDxV
            name, dims = item.split("=", 1)
            n, d, v = (int(x) for x in dims.lower().split("x"))
            shapes[name] = (n, d, v)
        else:
            raise SystemExit(f"unknown shape {item!r}: use {', '.join(SHAPES)} or name=NxDxV")
    if sweep:
        shapes.update(SWEEP_V)
    return shapes


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the .json and .md results")
    ap.add_argument("--shapes", default=None, help="comma list of gemma2, llama3, name=NxDxV")
    ap.add_argument("--sweep-v", action="store_true", help="add N=8192, D=2304, V=32k..256k (for plot.py)")
    ap.add_argument(
        "--providers",
        default=",".join(P.ALL_PROVIDERS),
        help=f"comma list of: {', '.join(P.ALL_PROVIDERS + P.EXTRA_PROVIDERS)} (default: all but the last), "
        "ours_budget@MIB (ours with memory_budget MIB MiB)",
    )
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument(
        "--data",
        default=None,
        help=f"comma list of: {', '.join(DATA)} (see providers.problem.make_inputs; default: all but "
        f"{TRAINED_LM}, which is added when its states file is given). {TRAINED_LM} runs once, at the "
        f"file's own N, D, V, as shape {TRAINED_LM!r}",
    )
    ap.add_argument(
        "--trained-lm",
        default=os.environ.get(P.TRAINED_LM_ENV) or None,
        metavar="PATH",
        help=f"the states of data {TRAINED_LM} (examples/train_lm.py --save-states PATH; default ${P.TRAINED_LM_ENV})",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--label", default=None)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip work left after this many seconds")
    ap.add_argument(
        "--paired-rounds",
        type=int,
        default=15,
        help="alternating ours / cuBLAS rounds per case, after the providers (0: none)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per measurement, median (5; 2 with --cpu-smoke)",
    )
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="NumPy backend, tiny shape, 2 repeats: checks that the defaults run (CI)",
    )
    args = ap.parse_args(argv)
    args.backend = "numpy" if args.cpu_smoke else "cupy"
    if args.repeats is None:
        args.repeats = 2 if args.cpu_smoke else 5
    if args.label is None:
        args.label = "cpu-smoke" if args.cpu_smoke else ("sweep-v" if args.sweep_v else "bench")
    args.shape_map = parse_shapes(args.shapes, args.sweep_v, args.cpu_smoke)
    args.provider_list = [s.strip() for s in args.providers.split(",") if s.strip()]
    for k in args.provider_list:
        if not P.known_provider(k):
            known = ", ".join(P.ALL_PROVIDERS + P.EXTRA_PROVIDERS)
            raise SystemExit(f"unknown provider {k!r}; known: {known}, ours_budget@MIB (ours with that memory_budget)")
    args.mode_list = [m for m in args.modes.split(",") if m]
    if args.data is None:
        args.data = ",".join(d for d in DATA if d != TRAINED_LM or args.trained_lm)
    args.data_list = [d for d in args.data.split(",") if d]
    for m in args.mode_list:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    for d in args.data_list:
        if d not in DATA:
            raise SystemExit(f"unknown data {d!r}; known: {', '.join(DATA)}")
    args.cases = cases(args.shape_map, args.data_list, args.trained_lm)
    return args


def cases(shape_map: dict, data_list: list[str], trained_lm: str | None) -> list[tuple]:
    """(shape, n, d, v, data) to run: every shape with every synthetic data set, then the trained
    LM's states once at their own dimensions."""
    out = [(s, n, d, v, data) for s, (n, d, v) in shape_map.items() for data in data_list if data != TRAINED_LM]
    if TRAINED_LM in data_list:
        if not trained_lm:
            raise SystemExit(
                f"--data {TRAINED_LM} needs the saved states: pass --trained-lm PATH or set "
                f"${P.TRAINED_LM_ENV} (examples/train_lm.py --save-states PATH writes them)"
            )
        if not os.path.isfile(trained_lm):
            raise SystemExit(
                f"--trained-lm {trained_lm!r}: no such file (examples/train_lm.py --save-states writes it)"
            )
        out.append((TRAINED_LM, *P.trained_lm_dims(trained_lm), TRAINED_LM))
    return out


def main(argv=None) -> Path:
    args = parse_args(argv)
    args.t_start = time.time()
    args.skipped = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.backend == "cupy":
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
        except Exception as ex:  # noqa: BLE001
            raise SystemExit(f"no CUDA device through CuPy ({ex}); use --cpu-smoke for the NumPy backend")
    now = _dt.datetime.now(_dt.timezone.utc)
    gpu = gpu_name(args.backend)
    meta = {"gpu": gpu, "date": now.isoformat(timespec="seconds"), "versions": versions(args.backend)}
    stem = f"{slug(gpu)}-{now:%Y%m%d}-{slug(args.label)}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    log(
        f"bench: {gpu}, backend {args.backend}, shapes {list(args.shape_map)}, data {args.data_list}, "
        f"providers {args.provider_list}, modes {args.mode_list}, {args.dtype}, repeats {args.repeats}, "
        f"budget {args.budget_s:.0f} s -> {json_path}"
    )
    records: list[dict] = []
    paired: list[dict] = []

    def elapsed() -> float:
        return time.time() - args.t_start

    for shape, n, d, v, data in args.cases:
        case = f"{shape}/{data}"
        if args.budget_s and elapsed() > args.budget_s:
            args.skipped.append(f"{case}: all providers")
            continue
        log(f"== {case} N={n} D={d} V={v} {args.dtype} (t={elapsed():.0f} s)")
        source = args.trained_lm if data == TRAINED_LM else None
        p = P.Problem(shape, n, d, v, args.dtype, data, args.backend, source)
        try:
            t0 = time.time()
            P.make_inputs(p)
            P.ground_truth(p)
            log(f"  inputs + fp32 ground truth {time.time() - t0:.1f} s, loss {p.truth['loss']:.5f}")
        except Exception as ex:  # noqa: BLE001 - no inputs, nothing to run for this case
            log(f"  FAILED to make inputs/ground truth: {type(ex).__name__}: {ex}")
            traceback.print_exc(limit=3)
            if p.e is None:
                args.skipped.append(f"{case}: inputs failed ({type(ex).__name__})")
                p.free()
                P.free_device_memory()
                continue
        for key in args.provider_list:
            if args.backend == "numpy" and P.provider_identity(key)[0] in P.GPU_ONLY:
                log(f"  {key}: skipped on the NumPy backend (needs CUDA)")
                continue
            why = P.skip_reason(key)
            if why:
                args.skipped.append(f"{case}: {key}: {why}")
                log(f"  {key}: skipped: {why}")
                continue
            left = args.budget_s - elapsed() if args.budget_s else float("inf")
            if left <= 0 or (key == "torch_compile" and left < 60):
                args.skipped.append(f"{case}: {key}")
                log(f"  {key}: skipped, budget spent ({left:.0f} s left)")
                continue
            log(f"  {key} (t={elapsed():.0f} s)")
            records += run_provider(key, p, args.mode_list, args, meta)
        if args.paired_rounds and args.backend == "cupy" and {"cublas", "ours"} <= set(args.provider_list):
            paired += paired_rounds(p, args.paired_rounds)
        p.free()
        P.free_device_memory()
        json_path.write_text(json.dumps(records, indent=1))  # after every case: a cut run keeps it
    json_path.write_text(json.dumps(records, indent=1))
    if paired:
        json_path.with_name(f"{stem}-paired.json").write_text(json.dumps(paired, indent=1))
    md = markdown(records, args.skipped, paired)
    md_path.write_text(md)
    log("")
    log(md)
    log(f"wrote {json_path} and {md_path} ({len(records)} records, {elapsed():.0f} s)")
    return json_path


if __name__ == "__main__":
    main()
