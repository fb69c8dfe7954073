"""The kernel sources as compiled (cce_cupy.cuda.sources): one definition of each tile constant,
the generated preamble, and the instance lists per architecture. CPU only, no compiler."""

from __future__ import annotations

import re

import pytest

from cce_cupy.cuda import prebuilt, sources

_KERNEL_TEXTS = {p.name: p.read_text() for p in sorted(sources.KERNEL_DIR.glob("*.cu*"))}


@pytest.mark.parametrize("name", sorted(sources.TILE_DEFINES))
def test_tile_constants_are_defined_only_in_the_preamble(name: str) -> None:
    """No kernel file defines a tile constant of its own: each comes from sources.py alone."""
    for filename, text in _KERNEL_TEXTS.items():
        assert not re.search(rf"#\s*define\s+{name}\b", text), f"{filename} defines {name}"
    assert f"#define {name} {sources.TILE_DEFINES[name]}\n" in sources.preamble()


@pytest.mark.parametrize("filename", sources.KERNEL_FILES)
def test_every_file_is_compiled_after_the_preamble(filename: str) -> None:
    text = sources.kernel_source(filename)
    assert text.startswith(sources.preamble())
    assert '#include "common.cuh"' not in text


def test_launch_constants_follow_from_the_tile_constants() -> None:
    """The shared memory the launchers give a block, from the tiles: the tiled kernels' epilogue
    tile (128 rows of 132 floats) outgrows their 3 stages of operands; the Hopper kernels hold 4
    stages of a 128-row and a 256-row tile of 128-byte rows. The kernels static_assert the fit."""
    assert sources.TILE_DEFINES["CCE_SMEM_BYTES"] == sources.GEMM_SMEM_BYTES == 128 * (128 + 4) * 4
    assert sources.TILE_DEFINES["H_SMEM_BYTES"] == sources.HOPPER_SMEM_BYTES == 4 * (128 + 256) * 128 + 1024
    assert sources.HOPPER_THREADS == 384


def test_enums_are_generated_for_the_kernels() -> None:
    """GemmMode and GemmK reach the kernels with the values backward.py passes, and an instance
    name spells the mode by name."""
    pre = sources.preamble()
    assert "enum class GemmMode : int { WRITE = 0, ACCUMULATE = 1, FOLD_CAST = 2 };" in pre
    assert "enum class GemmK : int { G_COLUMNS = 1, G_ROWS = 2 };" in pre
    name = sources.template_name("lce_gemm", "bfloat16", "float32", True, sources.GemmMode.ACCUMULATE)
    assert name == "lce_gemm<__nv_bfloat16, float, true, GemmMode::ACCUMULATE>"
    assert name in sources.all_instances()["lce_backward.cu"]


def test_cluster_kernels_are_built_for_sm_90_only() -> None:
    """ce_logits_inplace_cluster needs thread-block clusters: no sm_80 module holds it (it is not
    even defined there), the sm_90 modules hold every instance of it."""
    cluster = [n for n in sources.all_instances()["reductions.cu"] if n.startswith("ce_logits_inplace_cluster<")]
    assert len(cluster) == 3 * 2 * 4 * len(sources.CE_CLUSTER_SIZES)
    built = {arch: [] for arch in prebuilt.ARCHS}
    for arch, filename, group in prebuilt.all_modules():
        if filename == "reductions.cu":
            built[arch] += sources.module_groups(filename, arch)[group]
    assert not set(cluster) & set(built["sm_80"])
    assert set(cluster) <= set(built["sm_90"])
    assert set(built["sm_80"]) == set(sources.all_instances()["reductions.cu"]) - set(cluster)
    assert not set(cluster) & set(sources.instances_for("reductions.cu", arch="sm_80"))
    assert set(cluster) <= set(sources.instances_for("reductions.cu", arch="sm_90"))
