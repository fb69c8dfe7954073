"""Prebuilt cubins: every kernel module compiled ahead of time, shipped as package data.

A first call then loads machine code (milliseconds) instead of running NVRTC (18-57 s cold on an
H200). The set is built on a CPU by `python -m cce_cupy.cuda.prebuilt` (NVRTC through cuda-bindings,
with the options CuPy passes at run time), one cubin per module group of `cce_cupy.cuda.sources`:

    kernels/prebuilt/manifest.json       {"<arch>/<file>/<group>": {"key", "file", "sha256", "lowered"}}
    kernels/prebuilt/<arch>/<name>.cubin.xz

`key` hashes what the module is compiled from (the file's text with the generated preamble and
common.cuh, the options, the architecture and the instance list), so an edited kernel never loads a stale cubin:
its module is compiled at run time instead (one log line says so) until the set is rebuilt, and
the CPU test `tests/test_prebuilt.py` fails until then. `lowered` maps each template instance to
its mangled name in the cubin.

Architectures: sm_80 (runs on every 8.x GPU: cubins are forward compatible within a major
version), sm_90 and sm_90a (the wgmma file, Hopper only). Other GPUs compile at run time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import json
import lzma
import multiprocessing
import os
import sys
import time

from cce_cupy.cuda import sources

PREBUILT_DIR = sources.KERNEL_DIR / "prebuilt"
MANIFEST = PREBUILT_DIR / "manifest.json"
# The portable architectures every file is built for; files with a fixed one (FILE_ARCH) use it.
ARCHS = ("sm_80", "sm_90")
# Options CuPy adds to every RawModule compile (besides include paths): part of the module key.
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def file_archs(filename: str) -> tuple[str, ...]:
    fixed = sources.FILE_ARCH.get(filename)
    return (fixed,) if fixed else ARCHS


def arch_for(filename: str, compute_capability: str) -> str | None:
    """The prebuilt architecture a GPU of this compute capability ("90", "86") loads, or None."""
    fixed = sources.FILE_ARCH.get(filename)
    if fixed:
        return fixed if fixed.rstrip("a") == f"sm_{compute_capability}" else None
    if compute_capability == "90":
        return "sm_90"
    if compute_capability.startswith("8"):
        return "sm_80"
    return None


def module_id(arch: str, filename: str, group: str) -> str:
    return f"{arch}/{filename}/{group}"


@functools.cache  # every module load checks its key: hash each module's ~100 KB of source once
def module_key(arch: str, filename: str, group: str) -> str:
    """Hash of everything the module's cubin is compiled from (not the machine's include paths)."""
    h = hashlib.sha256()
    for part in (
        sources.kernel_source(filename),
        *sources.compile_options(filename),
        *CUPY_ADDED_OPTIONS,
        arch,
        *sources.module_groups(filename)[group],
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def all_modules() -> list[tuple[str, str, str]]:
    """(arch, file, group) of every module the prebuilt set holds (per architecture, the instances
    that exist there: no cluster kernels for sm_80)."""
    return [
        (arch, f, g) for f in sources.KERNEL_FILES for arch in file_archs(f) for g in sources.module_groups(f, arch)
    ]


@functools.cache
def manifest() -> dict:
    try:
        return json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return {}


def load_cubin(arch: str, filename: str, group: str) -> tuple[bytes, dict[str, str]] | None:
    """(cubin, {instance: mangled name}) of an up-to-date prebuilt module, or None."""
    entry = manifest().get("modules", {}).get(module_id(arch, filename, group))
    if not entry or entry.get("key") != module_key(arch, filename, group):
        return None
    try:
        cubin = lzma.decompress((PREBUILT_DIR / entry["file"]).read_bytes())
    except (OSError, lzma.LZMAError):
        return None
    return cubin, entry["lowered"]


def _cubin_file(arch: str, filename: str, group: str) -> str:
    stem = filename.split(".")[0]
    return f"{arch}/{stem}-{hashlib.sha1(group.encode()).hexdigest()[:12]}.cubin.xz"


def _build_one(arch: str, filename: str, group: str) -> tuple[str, dict]:
    """Compile one module (in a worker process); returns its manifest entry."""
    from cce_cupy.cuda.nvrtc_check import compile_source

    names = sources.module_groups(filename)[group]
    cubin, _log, lowered = compile_source(filename, names, arch)
    data = lzma.compress(cubin, preset=9)
    rel = _cubin_file(arch, filename, group)
    path = PREBUILT_DIR / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return module_id(arch, filename, group), {
        "key": module_key(arch, filename, group),
        "file": rel,
        "sha256": hashlib.sha256(data).hexdigest(),
        "lowered": lowered,
    }


def stale_modules() -> list[tuple[str, str, str]]:
    """Modules whose prebuilt cubin is missing, or was built from other sources or options."""
    have = manifest().get("modules", {})
    out = []
    for arch, f, g in all_modules():
        entry = have.get(module_id(arch, f, g))
        if not entry or entry["key"] != module_key(arch, f, g) or not (PREBUILT_DIR / entry["file"]).exists():
            out.append((arch, f, g))
    return out


def build(jobs: int | None = None, log=print) -> int:
    """Compile every stale module in parallel processes and rewrite the manifest; returns how many
    were compiled. Cubins of modules that no longer exist are deleted."""
    from cuda.bindings import nvrtc

    todo = stale_modules()
    modules = dict(manifest().get("modules", {}))
    t0 = time.time()
    if todo:
        # spawn: workers must not inherit state of a parent that may have touched CUDA.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs or os.cpu_count(), mp_context=ctx) as ex:
            futures = [ex.submit(_build_one, *m) for m in todo]
            for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                mid, entry = fut.result()
                modules[mid] = entry
                log(f"[{i}/{len(todo)}] {mid} ({time.time() - t0:.0f} s)")
    wanted = {module_id(*m) for m in all_modules()}
    modules = {k: v for k, v in sorted(modules.items()) if k in wanted}
    keep = {v["file"] for v in modules.values()}
    for path in PREBUILT_DIR.glob("*/*.cubin.xz"):
        if path.relative_to(PREBUILT_DIR).as_posix() not in keep:
            path.unlink()
    err, major, minor = nvrtc.nvrtcVersion()
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(json.dumps({"nvrtc": f"{major}.{minor}", "modules": modules}, indent=1) + "\n")
    manifest.cache_clear()
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    p.add_argument("--check", action="store_true", help="only list stale modules; exit 1 if any")
    args = p.parse_args(argv)
    if args.check:
        stale = stale_modules()
        for m in stale:
            print("stale:", module_id(*m))
        print(f"{len(stale)} of {len(all_modules())} prebuilt modules stale")
        return 1 if stale else 0
    t0 = time.time()
    n = build(args.jobs)
    total = sum(p.stat().st_size for p in PREBUILT_DIR.glob("*/*.cubin.xz"))
    print(
        f"compiled {n} of {len(all_modules())} modules in {time.time() - t0:.0f} s; "
        f"prebuilt set {total / 2**20:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
