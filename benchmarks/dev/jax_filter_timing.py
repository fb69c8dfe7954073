"""The JAX certified filter against JAX's exact loss (dev, issue 14): jit(value_and_grad) at a
model shape on sharp data (rows certify) and long-tailed data (none do), shuffled rounds, median ms.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.dev.jax_filter_timing [--rounds 7]
        [--shapes gemma2] [--data sharp,long_tailed]

The first filtered call of each data set runs the exact backward (no earlier counts), later ones
the gated path where the previous call certified at least half its rows (docs/jax.md).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import cupy as cp
import jax
import jax.numpy as jnp

from benchmarks.dev.filter_timing import make_data
from jax_bindings import linear_cross_entropy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="gemma2")
    ap.add_argument("--data", default="sharp,long_tailed")
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        for data in args.data.split(","):
            e, c, t = (jnp.asarray(cp.asnumpy(x)) for x in make_data(shape, data))
            cp.get_default_memory_pool().free_all_blocks()

            def step_for(**kw):
                return jax.jit(jax.value_and_grad(lambda a, b: linear_cross_entropy(a, b, t, **kw), argnums=(0, 1)))

            steps = {"exact": step_for(), "filtered": step_for(filter_eps="auto")}
            for f in steps.values():  # compile, and the filter's first (exact) call
                jax.block_until_ready(f(e, c))
            times = {k: [] for k in steps}
            for _ in range(args.rounds):
                order = list(steps)
                random.shuffle(order)
                for k in order:
                    t0 = time.perf_counter()
                    jax.block_until_ready(steps[k](e, c))
                    times[k].append(1e3 * (time.perf_counter() - t0))
            ms = {k: statistics.median(v) for k, v in times.items()}
            print(
                shape,
                data,
                {k: round(v, 2) for k, v in ms.items()},
                f"filtered/exact {ms['filtered'] / ms['exact']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
