"""Logits-level cross-entropy (`cce_cupy.cross_entropy`) against PyTorch on materialized logits.

Times, on one GPU in one process: ours forward (one read of the logits) and forward + in-place
backward, PyTorch eager `F.cross_entropy` (forward; forward + backward, which allocates an N x V
gradient) and the same under torch.compile. Writes `<gpu>-<date>-logits.json` (the results format
of benchmarks/README.md) and prints the fraction of the memory-bandwidth floor that ours reaches:
bytes that must move (forward: the logits read once; in place: read once, written once) over the
device-to-device copy bandwidth measured in the same run.
Usage: python benchmarks/bench_logits.py --out DIR [--shape N,V]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import cupy as cp
import numpy as np
import torch
import torch.nn.functional as F

import cce_cupy


def cuda_ms(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        t.record()
        t.synchronize()
        times.append(s.elapsed_time(t))
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="8192,256000")
    args = ap.parse_args()
    n, v = (int(x) for x in args.shape.split(","))
    gpu = torch.cuda.get_device_name()
    logits0 = torch.randn(n, v, device="cuda", dtype=torch.bfloat16) * 2
    targets = torch.randint(0, v, (n,), device="cuda")
    nbytes = logits0.numel() * logits0.element_size()
    copy_dst = torch.empty_like(logits0)
    bw = 2 * nbytes / (cuda_ms(lambda: copy_dst.copy_(logits0)) * 1e-3)  # bytes read + written per s
    copy_dst = None
    work = logits0.clone()
    rows = []

    def record(provider, mode, ms, moved_bytes=None, extra_mib=None, err=None):
        rows.append(
            {
                "gpu": gpu,
                "date": datetime.date.today().isoformat(),
                "versions": {"torch": torch.__version__, "cupy": cp.__version__},
                "shape": f"logits_{n}x{v}",
                "N": n,
                "D": None,
                "V": v,
                "dtype": "bfloat16",
                "data": "uniform",
                "provider": provider,
                "mode": mode,
                "filter": False,
                "ms": ms,
                "extra_mib": extra_mib,
                "rel_err_loss": err,
                "rel_err_de": None,
                "rel_err_dc": None,
                "note": None
                if moved_bytes is None
                else f"{moved_bytes / (ms * 1e-3) / bw:.2f} of the copy bandwidth {bw / 1e12:.2f} TB/s",
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    truth = F.cross_entropy(logits0.float(), targets).item()
    # ours, forward only: the logits are read once.
    loss = cce_cupy.cross_entropy(work, targets)
    record(
        "ours",
        "fwd",
        cuda_ms(lambda: cce_cupy.cross_entropy(work, targets)),
        nbytes,
        0.0,
        abs(float(loss) - truth) / abs(truth),
    )
    # ours, forward + in-place backward (the buffer is refilled from logits0 outside the timing).
    times = []
    for _ in range(5):
        work.copy_(logits0)
        s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        cce_cupy.cross_entropy(work, targets, inplace_backward=True)
        t.record()
        t.synchronize()
        times.append(s.elapsed_time(t))
    record("ours", "fwd_bwd", float(np.median(times)), 2 * nbytes, 0.0)
    work = None

    def torch_fwd_bwd(fn):
        x = logits0.detach().requires_grad_(True)

        def step():
            x.grad = None
            fn(x, targets).backward()

        return step

    eager = F.cross_entropy
    compiled = torch.compile(F.cross_entropy)
    for name, fn in (("torch", eager), ("torch_compile", compiled)):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = cuda_ms(lambda: fn(logits0, targets))
        record(name, "fwd", ms, nbytes, (torch.cuda.max_memory_allocated() - base) / 2**20)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = cuda_ms(torch_fwd_bwd(fn))
        record(name, "fwd_bwd", ms, 2 * nbytes, (torch.cuda.max_memory_allocated() - base) / 2**20)
    os.makedirs(args.out, exist_ok=True)
    name = f"{gpu.lower().replace(' ', '-')}-{datetime.date.today():%Y%m%d}-logits.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
