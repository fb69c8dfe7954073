"""Which step makes a filtered call that certifies nothing differ from the exact call (dev).

    python -m benchmarks.dev.uncertified_bitwise

On test_cuda_filter's Zipf data: the exact call twice (run-to-run), the forward's lse with and
without its lists, and the filtered call with and without its exact fallback reusing the lists'
scratch (backward._reusable). Prints which outputs differ bitwise, and where.
"""

from __future__ import annotations

import sys

import cupy as cp
import numpy as np

sys.path.insert(0, "tests")
from conftest import make_zipf_problem  # noqa: E402

import cce_cupy as cce  # noqa: E402
from cce_cupy.cuda import backward as cuda_backward  # noqa: E402


def diff(name, a, b):
    a, b = (cp.asnumpy(x).reshape(-1).view(np.uint8) for x in (a, b))
    bad = np.flatnonzero(a != b)
    print(f"{name}: {'same' if bad.size == 0 else f'{bad.size} bytes differ, first at byte {bad[0]}'}")


def main() -> None:
    e, c, t = make_zipf_problem(512, 64, 32768, "bfloat16", seed=0)
    args = (cp.asarray(e), cp.asarray(c), cp.asarray(t))
    x1 = cce.linear_cross_entropy_with_grad(*args)
    x2 = cce.linear_cross_entropy_with_grad(*args)
    for k, a, b in zip(("loss", "de", "dc"), x1, x2):
        diff(f"exact vs exact: {k}", a, b)
    f1 = cce.linear_cross_entropy_with_grad(*args, filter_eps="auto")
    for k, a, b in zip(("loss", "de", "dc"), x1, f1):
        diff(f"exact vs filtered: {k}", a, b)
    real = cuda_backward._reusable
    cuda_backward._reusable = lambda *a, **k: None
    f2 = cce.linear_cross_entropy_with_grad(*args, filter_eps="auto")
    cuda_backward._reusable = real
    for k, a, b in zip(("loss", "de", "dc"), x1, f2):
        diff(f"exact vs filtered, fresh scratch: {k}", a, b)
    lse_plain, _ = cce.forward(*args)
    from cce_cupy.cuda import filtered

    n, d = e.shape
    lse, tgt = cp.empty(n, cp.float32), cp.empty(n, cp.float32)
    de, dc = cp.empty_like(args[0]), cp.empty_like(args[1])
    o = cce.CCEOptions(filter_eps="auto")
    filtered.launch_fused_filtered(*args, None, o, args[2] != -100, cp.asarray(1.0, cp.float32), lse, tgt, de, dc, None)
    diff("lse plain vs lists forward", lse_plain, lse)
    diff("launcher dc vs exact", dc, x1[2])


if __name__ == "__main__":
    main()
