"""Where the ROW forward's time over cuBLAS goes: the budgeted path's forward (STORE ROW, split
halves) built with parts of its epilogue taken out, timed in shuffled rounds beside the built
kernel, the lean (STORE NONE) forward and cuBLAS E @ C^T. Development only: the variants give
wrong results by design.

    python -m benchmarks.dev.row_variants --build DIR     # here (no GPU): NVRTC, sm_90a cubins
    python -m benchmarks.dev.row_variants --cubins DIR    # on the H200: time them

Variants (source edits of lce_hopper.cu): base (unchanged: a control against the prebuilt kernel),
no_store (stage_half returns at once: no stmatrix, barriers or TMA stores), no_exp (the shifted
exps are an FFMA, not ex2: no MUFU), neither (both). A variant "warp_stores" (each warp staging and
storing its own 16 rows, __syncwarp for the warpgroup's named barriers) measured 0.5-1% faster and
became the kernel's (docs/history.md, sixth session).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import ml_dtypes
import numpy as np

from cce_cupy.cuda.sources import SoftmaxStore, kernel_source, template_name

_STAGE = "__device__ __forceinline__ void stage_half(int n0, int half, const float (&acc)[NV]) {"
_EXP = "const float ex = fast_exp2(fmaf(acc[i], H_LOG2E, -shift_b[h]));"
EDITS = {
    "base": [],
    "no_store": [(_STAGE, _STAGE + "\n        return;")],
    "no_exp": [(_EXP, "const float ex = fmaf(acc[i], H_LOG2E, -shift_b[h]);")],
}
EDITS["neither"] = EDITS["no_store"] + EDITS["no_exp"]


def _names() -> list[str]:
    bf16 = np.dtype(ml_dtypes.bfloat16)
    return [
        template_name("lce_forward_partials_sm90", cl, bf16, False, False, False, SoftmaxStore.ROW) for cl in (1, 2)
    ]


def build(out: pathlib.Path) -> None:
    from cce_cupy.cuda import nvrtc_check

    out.mkdir(parents=True, exist_ok=True)
    source = kernel_source("lce_hopper.cu")
    lowered = {}
    for variant, edits in EDITS.items():
        text = source
        for old, new in edits:
            assert text.count(old) == 1, (variant, old)
            text = text.replace(old, new)
        nvrtc_check.kernel_source = lambda filename, _t=text: _t  # compile_source reads it by name
        cubin, _, low = nvrtc_check.compile_source("lce_hopper.cu", _names(), "sm_90a")
        (out / f"{variant}.cubin").write_bytes(cubin)
        lowered = low
        print(f"built {variant}", flush=True)
    (out / "lowered.json").write_text(json.dumps(lowered))


def time_variants(cubins: pathlib.Path, rounds: int, shapes: list[str]) -> None:
    import cupy as cp

    from benchmarks.dev.budget_timing import make_inputs, shuffled_rounds
    from cce_cupy.cuda import autotune, loader
    from cce_cupy.cuda.budget import launch_target_logits
    from cce_cupy.cuda.device import gpu_name
    from cce_cupy.cuda.forward import KeptSoftmax, launch_forward
    from cce_cupy.cuda.plan import forward_scratch_nbytes
    from cce_cupy.cuda.sources import HOPPER_SMEM_BYTES, HOPPER_STAGING_BYTES
    from cce_cupy.options import CCEOptions

    lowered = json.loads((cubins / "lowered.json").read_text())
    modules = {p.stem: cp.RawModule(path=str(p)) for p in sorted(cubins.glob("*.cubin"))}
    dev = cp.cuda.Device().id
    opts = CCEOptions()
    for shape in shapes:
        e, c, t = make_inputs(shape)
        n, d = e.shape
        v = c.shape[0]
        lds = (v + 7) // 8 * 8
        s = cp.empty((n, lds), e.dtype)
        shift, z_target, lse, tgt = (cp.empty(n, cp.float32) for _ in range(4))
        unsafe = cp.zeros(n, cp.int32)
        scratch = cp.empty(forward_scratch_nbytes(n, v, d, e.dtype), cp.uint8)
        logits = cp.empty((n, v), e.dtype)
        launch_target_logits(e, c, t, None, opts, None, shift, z_target, unsafe)
        row = KeptSoftmax(SoftmaxStore.ROW, s, row_shift=shift, unsafe=unsafe)
        launch_forward(e, c, t, None, opts, lse, tgt, scratch, None, True, row)  # tunes the cluster once
        cluster = autotune.hopper_cluster(gpu_name(), "bfloat16", n, d, v, None)
        name = _names()[cluster - 1]
        kernel = loader.get_kernel("lce_hopper.cu", name)
        built = kernel.function(dev)
        variants = {}
        for variant, module in modules.items():
            fn = module.get_function(lowered[name]).kernel
            cp.cuda.driver.funcSetAttribute(
                fn.ptr,
                cp.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                HOPPER_SMEM_BYTES + HOPPER_STAGING_BYTES,
            )
            variants[variant] = fn

        def run_row(fn):
            def go():
                kernel._by_device[dev] = fn
                launch_forward(e, c, t, None, opts, lse, tgt, scratch, None, False, row)
                kernel._by_device[dev] = built

            return go

        runs = {"cublas": lambda: cp.matmul(e, c.T, out=logits), "prebuilt_row": run_row(built)}
        runs["lean_none"] = lambda: launch_forward(e, c, t, None, opts, lse, tgt, scratch, None, False, None)
        runs.update({f"row_{k}": run_row(fn) for k, fn in variants.items()})
        kept = {}
        for k in ("prebuilt_row", "row_base"):  # the control: the same s and lse as the built kernel
            s.fill(0)
            runs[k]()
            kept[k] = (s[:, :v].copy(), lse.copy())
        same = all(bool((a == b).all()) for a, b in zip(kept["row_base"], kept["prebuilt_row"]))
        print(json.dumps({"shape": shape, "base_same_s_and_lse_as_prebuilt": same}), flush=True)
        del kept
        times = shuffled_rounds(runs, rounds)
        ref = statistics.median(times["cublas"])
        for k, ts in times.items():
            ms = statistics.median(ts)
            print(json.dumps({"shape": shape, "cluster": cluster, "variant": k, "ms": round(ms, 3),
                              "x_cublas": round(ms / ref, 4)}), flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", type=pathlib.Path)
    ap.add_argument("--cubins", type=pathlib.Path)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="gemma2,llama3")
    args = ap.parse_args()
    if args.build:
        build(args.build)
    if args.cubins:
        time_variants(args.cubins, args.rounds, args.shapes.split(","))


if __name__ == "__main__":
    main()
