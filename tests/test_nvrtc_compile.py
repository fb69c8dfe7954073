"""Every kernel file and template instance compiles for sm_80 and sm_90 (sm_90a for the Hopper
file) with NVRTC, on a CPU: checked through the prebuilt cubin set (cce_cupy/cuda/prebuilt.py).

Every module's cubin is compiled by `python -m cce_cupy.cuda.prebuilt` (`.ci/run` runs it first, so CI
compiles any module whose source changed) through `cce_cupy.cuda.nvrtc_check.compile_source`, with the
options CuPy passes at run time, and recorded under a hash of its source, options, architecture
and instance list. The tests here check that the set is current, that every cubin is intact and
holds every instance, and that NVRTC here still compiles a module to the same kernel names. Each
kernel's stack frame is read out of the cubin (an ELF file): a non-zero one means local memory
(register spills or a local array), reported in a warning, not failed on.
"""

from __future__ import annotations

import hashlib
import lzma
import struct
import warnings

import pytest

from cce_cupy.cuda import prebuilt, sources
from cce_cupy.cuda.nvrtc_check import compile_source

pytest.importorskip("cuda.bindings.nvrtc", reason="needs cuda-bindings (pip install -e .[test])")
pytest.importorskip("cupy", reason="needs cupy for its NVRTC include paths (pip install -e .[test])")


# Attributes of the global .nv.info section of a cubin: (format byte 0x04, attribute, size,
# symbol index u32, value u32). REGCOUNT and FRAME_SIZE are what `ptxas -v` prints as
# "Used N registers" and "N bytes stack frame".
_EIATTR_FRAME_SIZE = 0x11
_EIATTR_REGCOUNT = 0x2F


def _sections(elf: bytes) -> dict[str, tuple[int, int, int]]:
    """{name: (offset, size, sh_info)} of a 64-bit little-endian ELF file."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2, "cubin is not a 64-bit ELF file"
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    strtab = raw[shstrndx][4]

    def name(off: int) -> str:
        start = strtab + off
        return elf[start : elf.index(b"\0", start)].decode()

    return {name(s[0]): (s[4], s[5], s[7]) for s in raw}


def kernel_resources(cubin: bytes) -> dict[str, tuple[int, int]]:
    """{mangled kernel name: (registers per thread, stack frame bytes)} read from a cubin."""
    secs = _sections(cubin)
    sym_off, sym_size, _ = secs[".symtab"]
    str_off = secs[".strtab"][0]
    names = []
    for i in range(sym_size // 24):
        (st_name,) = struct.unpack_from("<I", cubin, sym_off + 24 * i)
        start = str_off + st_name
        names.append(cubin[start : cubin.index(b"\0", start)].decode())
    regs: dict[str, int] = {}
    frame: dict[str, int] = {}
    off, size, _ = secs.get(".nv.info", (0, 0, 0))
    pos = off
    while pos + 4 <= off + size:
        fmt, attr, length = cubin[pos], cubin[pos + 1], struct.unpack_from("<H", cubin, pos + 2)[0]
        if fmt == 0x04 and length == 8 and attr in (_EIATTR_REGCOUNT, _EIATTR_FRAME_SIZE):
            sym, value = struct.unpack_from("<II", cubin, pos + 4)
            (regs if attr == _EIATTR_REGCOUNT else frame)[names[sym]] = value
        pos += 4 + length if fmt == 0x04 else 4
    for sec, (_, _, info) in secs.items():  # fallback: registers sit in the top byte of sh_info
        if sec.startswith(".text."):
            regs.setdefault(sec[len(".text.") :], info >> 24)
    return {k: (regs[k], frame.get(k, 0)) for k in regs}


def _lowered_in_symtab(cubin: bytes) -> set[str]:
    secs = _sections(cubin)
    sym_off, sym_size, _ = secs[".symtab"]
    str_off = secs[".strtab"][0]
    out = set()
    for i in range(sym_size // 24):
        (st_name,) = struct.unpack_from("<I", cubin, sym_off + 24 * i)
        start = str_off + st_name
        out.add(cubin[start : cubin.index(b"\0", start)].decode())
    return out


def test_prebuilt_set_is_current():
    """Every module has a cubin built from today's sources and options (.ci/run builds stale ones;
    by hand: python -m cce_cupy.cuda.prebuilt)."""
    stale = prebuilt.stale_modules()
    assert not stale, (
        f"{len(stale)} prebuilt modules are missing or older than their source, e.g. "
        f"{prebuilt.module_id(*stale[0])}: run `python -m cce_cupy.cuda.prebuilt` and commit cce_cupy/kernels/prebuilt"
    )


@pytest.mark.parametrize("filename", sources.KERNEL_FILES)
def test_prebuilt_cubins_hold_every_instance(filename: str) -> None:
    """Each cubin is intact (its recorded hash), an ELF file holding every instance of its module;
    kernels with a stack frame (spills or local arrays) are reported in one warning, not failed."""
    entries = prebuilt.manifest()["modules"]
    stacked = []
    for arch, f, group in prebuilt.all_modules():
        if f != filename:
            continue
        entry = entries[prebuilt.module_id(arch, f, group)]
        data = (prebuilt.PREBUILT_DIR / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{entry['file']}: corrupted"
        cubin = lzma.decompress(data)
        names = sources.module_groups(f)[group]
        assert sorted(entry["lowered"]) == sorted(names)
        missing = set(entry["lowered"].values()) - _lowered_in_symtab(cubin)
        assert not missing, f"{arch}/{f}/{group}: kernels missing from the cubin: {sorted(missing)[:3]}"
        for kernel, (_regs, frame) in kernel_resources(cubin).items():
            if frame:
                stacked.append(f"{arch} {kernel}: {frame} B")
    if stacked:
        warnings.warn(f"{filename}: {len(stacked)} kernels use local memory: " + "; ".join(stacked[:3]), stacklevel=1)


@pytest.mark.parametrize("arch", prebuilt.ARCHS)
def test_nvrtc_compiles_like_the_prebuilt_set(arch: str) -> None:
    """NVRTC with CuPy's run-time options compiles a module here and names its kernels as the
    prebuilt set does (the smallest module: the full set takes minutes on 2 cores)."""
    filename = "lce_sparse.cu"
    group = min(sources.module_groups(filename), key=lambda g: len(sources.module_groups(filename)[g]))
    names = sources.module_groups(filename)[group]
    cubin, _log, lowered = compile_source(filename, names, arch)
    assert set(lowered.values()) <= _lowered_in_symtab(cubin)
    assert lowered == prebuilt.manifest()["modules"][prebuilt.module_id(arch, filename, group)]["lowered"]
