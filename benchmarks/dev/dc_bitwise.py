"""Diagnostic: is the exact call's dC bitwise reproducible from call to call at the filter tests'
Zipf shape (N=512, D=64, V=32768, bf16), and does the filtered call (no row certified: the exact
backward) match it? Prints how many dC elements differ between calls."""

import sys

import cupy as cp

sys.path.insert(0, "tests")
from conftest import make_zipf_problem  # noqa: E402

import cce_cupy as cce  # noqa: E402

e, c, t = (cp.asarray(x) for x in make_zipf_problem(512, 64, 32768, "bfloat16", seed=0))
runs = []
junk = []
for i in range(3):
    runs.append(("exact", cce.linear_cross_entropy_with_grad(e, c, t)))
    junk.append(cp.empty(int(3e6) * (i + 1), cp.uint8))  # move the memory pool's state between calls
    runs.append(("filtered", cce.linear_cross_entropy_with_grad(e, c, t, filter_eps="auto")))
ref = runs[0][1]
for k, (name, out) in enumerate(runs):
    diffs = [int((a.view(cp.uint16) != b.view(cp.uint16)).sum()) if a.ndim else int(a != b) for a, b in zip(ref, out)]
    print(f"call {k} ({name}) vs call 0 (exact): differing elements loss/de/dc = {diffs}")
