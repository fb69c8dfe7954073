"""Every kernel file and template instance compiles for sm_80 and sm_90 (sm_90a for the Hopper
file) with NVRTC, on a CPU.

This goes through `cce_cupy.nvrtc_check.compile_source`, which uses the options CuPy passes at
run time, so CI compiles exactly what the GPU runs. The test also reads each kernel's register
count and stack frame out of the cubin (an ELF file) and prints them: a non-zero stack frame
means local memory (register spills or a local array). That is reported, not failed on.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import warnings

import pytest

from cce_cupy import kernel_sources
from cce_cupy.nvrtc_check import compile_source

pytest.importorskip("cuda.bindings.nvrtc", reason="needs cuda-bindings (pip install -e .[test])")
pytest.importorskip("cupy", reason="needs cupy for its NVRTC include paths (pip install -e .[test])")

ARCHS = ("sm_80", "sm_90")

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


def _demangle(names: list[str]) -> list[str]:
    if not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=False)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else names


CASES = [
    (f, a) for f in kernel_sources.KERNEL_FILES
    for a in ((kernel_sources.FILE_ARCH[f],) if f in kernel_sources.FILE_ARCH else ARCHS)
]


@pytest.mark.parametrize("filename,arch", CASES)
def test_compiles_every_instance(filename: str, arch: str, capsys: pytest.CaptureFixture) -> None:
    names = kernel_sources.all_instances()[filename]
    assert names, f"no template instances listed for {filename}"
    cubin, _log = compile_source(filename, names, arch)
    assert len(cubin) > 0, f"{filename} for {arch}: empty cubin"

    resources = kernel_resources(cubin)
    assert len(resources) >= len(names), (
        f"{filename} for {arch}: {len(names)} instances asked for, {len(resources)} kernels in the cubin"
    )
    mangled = sorted(resources)
    lines = [f"{filename} {arch}: {len(resources)} kernels, registers / stack frame bytes"]
    stacked = []
    for m, pretty in zip(mangled, _demangle(mangled)):
        regs, frame = resources[m]
        lines.append(f"  {regs:4d} regs {frame:6d} B stack  {pretty}")
        if frame:
            stacked.append(f"{pretty}: {frame} B")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    if stacked:
        warnings.warn(
            f"{filename} {arch}: {len(stacked)} kernels use local memory (spills or local arrays): "
            + "; ".join(stacked[:5]),
            stacklevel=1,
        )
