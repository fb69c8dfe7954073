"""The autotuner's choice logic and its disk cache (CPU: the timing function is a stand-in)."""

from __future__ import annotations

import json

import pytest

from cce_cupy.cuda import autotune
from cce_cupy.cuda.sources import HOPPER_CLUSTERS


def test_choose_times_each_candidate_once_then_caches(tmp_path):
    path = tmp_path / "tune.json"
    timed = []

    def time_candidate(c):
        timed.append(c)
        return {1: 5.0, 2: 3.0}[c]

    cache = autotune.TuningCache(path)
    assert cache.choose("k", HOPPER_CLUSTERS, time_candidate) == 2
    runs = 1 + autotune.TIMED_ROUNDS
    assert sorted(timed) == [1] * runs + [2] * runs
    assert timed[2:6] == [1, 2, 2, 1], "candidates take turns in alternating order"
    n = len(timed)
    assert cache.choose("k", HOPPER_CLUSTERS, time_candidate) == 2
    assert len(timed) == n, "re-tuned a cached key"
    # A new process (a fresh cache object) reads the choice from disk and does not time again.
    assert autotune.TuningCache(path).choose("k", HOPPER_CLUSTERS, time_candidate) == 2
    assert len(timed) == n
    assert json.loads(path.read_text()) == {"k": 2}


def test_choice_is_by_median_not_one_outlier(tmp_path):
    calls = {1: 0, 2: 0}

    def time_candidate(c):  # candidate 1 is faster except for one slow outlier run
        calls[c] += 1
        return {1: 50.0 if calls[1] == 3 else 2.0, 2: 3.0}[c]

    assert autotune.TuningCache(tmp_path / "t.json").choose("k", (1, 2), time_candidate) == 1


def test_put_merges_with_other_writers(tmp_path):
    path = tmp_path / "tune.json"
    a, b = autotune.TuningCache(path), autotune.TuningCache(path)
    a.put("x", 1)
    b.put("y", 2)
    assert json.loads(path.read_text()) == {"x": 1, "y": 2}


def test_unreadable_cache_starts_empty(tmp_path):
    path = tmp_path / "tune.json"
    path.write_text("not json")
    assert autotune.TuningCache(path).get("k") is None


def test_key_has_gpu_dtype_shape_class_and_version():
    k = autotune.tuning_key("NVIDIA H100 80GB HBM3", "bfloat16", 8192, 2304, 256000)
    assert k.startswith("NVIDIA H100 80GB HBM3|bfloat16|N8192|D2304|V262144|")
    assert k.endswith(autotune.kernel_version())
    assert autotune.tuning_key("g", "bfloat16", 5000, 2304, 200000) == autotune.tuning_key(
        "g", "bfloat16", 8192, 2304, 262144
    )
    assert autotune.tuning_key("g", "bfloat16", 8192, 2304, 256000) != autotune.tuning_key(
        "g", "float16", 8192, 2304, 256000
    )


def test_hopper_cluster_forced_cached_default(tmp_path, monkeypatch):
    monkeypatch.setenv("CCE_CUPY_AUTOTUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.delenv("CCE_CUPY_HOPPER_CLUSTER", raising=False)
    args = ("gpu", "bfloat16", 8192, 4096, 128256)
    # Not allowed to tune and nothing cached: the default, and nothing recorded.
    assert autotune.hopper_cluster(*args) == autotune.DEFAULT_CLUSTER
    assert not (tmp_path / "tune.json").exists()
    # Allowed: tuned once; later calls (even those not allowed to tune) get the cached choice.
    assert autotune.hopper_cluster(*args, time_candidate=lambda c: 1.0 / c) == 2
    assert autotune.hopper_cluster(*args) == 2
    assert autotune.hopper_cluster(*args, time_candidate=lambda c: pytest.fail("re-tuned")) == 2
    monkeypatch.setenv("CCE_CUPY_HOPPER_CLUSTER", "1")
    assert autotune.hopper_cluster(*args) == 1
    monkeypatch.setenv("CCE_CUPY_HOPPER_CLUSTER", "3")
    with pytest.raises(ValueError, match="CCE_CUPY_HOPPER_CLUSTER"):
        autotune.hopper_cluster(*args)


@pytest.mark.parametrize(
    "text",
    [
        '{"k": null}',
        '{"k": [2]}',
        '{"k": {"a": 1}}',
        '{"other": null, "k": 2}',
        '{"k": Infinity}',
        '{"k": 7}',
        '{"k": 0}',
        '{"k": true}',
        '{"k": "2"}',
        '{"k": 2.5}',
        "[1, 2]",
        "[" * 100000,
        "\udcff",
    ],
)
def test_corrupt_cache_entries_are_dropped(tmp_path, text):
    path = tmp_path / "tune.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    cache = autotune.TuningCache(path)
    want = 2 if text == '{"other": null, "k": 2}' else None
    assert cache.get("k") == want and cache.get("other") is None
    # A bad file is also no obstacle to writing the next choice.
    cache.put("x", 1)
    assert autotune.TuningCache(path).get("x") == 1


def test_corrupt_cache_does_not_break_hopper_cluster(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("CCE_CUPY_AUTOTUNE_CACHE", str(path))
    monkeypatch.delenv("CCE_CUPY_HOPPER_CLUSTER", raising=False)
    args = ("gpu-corrupt", "bfloat16", 64, 64, 64)
    path.write_text(json.dumps({autotune.tuning_key(*args): 7}))
    assert autotune.hopper_cluster(*args) == autotune.DEFAULT_CLUSTER


def _writer(path, prefix, count):
    cache = autotune.TuningCache(path)
    for i in range(count):
        cache.put(f"{prefix}-{i}", 1 + i % 2)


def test_concurrent_writers_keep_every_entry(tmp_path):
    import multiprocessing

    path = tmp_path / "tune.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, f"p{k}", 25)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    data = json.loads(path.read_text())
    assert len(data) == 100 and data == {f"p{k}-{i}": 1 + i % 2 for k in range(4) for i in range(25)}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["tune.json", "tune.json.lock"], "temp files left"


def test_write_keeps_mode_and_symlink(tmp_path, monkeypatch):
    import os
    import stat

    real = tmp_path / "real.json"
    real.write_text("{}")
    os.chmod(real, 0o664)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    autotune.TuningCache(link).put("k", 2)
    assert link.is_symlink() and json.loads(real.read_text()) == {"k": 2}
    assert stat.S_IMODE(real.stat().st_mode) == 0o664
    # A new file: 0644 less the umask.
    old = os.umask(0o027)
    try:
        autotune.TuningCache(tmp_path / "new.json").put("k", 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640


def test_failed_replace_removes_temp_file(tmp_path, monkeypatch):
    import os

    def fail(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    autotune.TuningCache(tmp_path / "tune.json").put("k", 1)  # the disk copy is lost, no error
    assert sorted(f.name for f in tmp_path.iterdir()) == ["tune.json.lock"]


@pytest.mark.parametrize("value", ["foo", "3", " 2x"])
def test_forced_cluster_names_the_variable(value, monkeypatch):
    monkeypatch.setenv("CCE_CUPY_HOPPER_CLUSTER", value)
    with pytest.raises(ValueError, match=r"CCE_CUPY_HOPPER_CLUSTER must be one of 1, 2"):
        autotune.hopper_cluster("gpu", "bfloat16", 64, 64, 64)


def test_empty_forced_cluster_is_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("CCE_CUPY_AUTOTUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setenv("CCE_CUPY_HOPPER_CLUSTER", "")
    assert autotune.hopper_cluster("gpu-empty", "bfloat16", 64, 64, 64) == autotune.DEFAULT_CLUSTER
