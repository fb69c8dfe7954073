"""The Hopper kernels' cluster size, picked per GPU, dtype and shape class by timing, once.

The wgmma kernels (lce_hopper.cu) run with CLUSTER = 1 (each block loads its whole C tile) or 2
(pairs of row blocks share it through TMA multicast). Which is faster depends on the shape: on an
H100, 2 wins at llama3's (8192, 4096, 128256) and loses at gemma2's (8192, 2304, 256000). The first
CuPy forward of a shape class times the forward kernel with each candidate on the call's own
inputs (it only writes the scratch partials, so rerunning it is harmless; the candidates take
turns, 7 runs each) and records the faster.
The choice is cached in memory and in a JSON file, keyed by GPU name, dtype, shape class and
kernel version (the package version and a hash of the kernel source), so it is never re-tuned on
every call, and a kernel edit starts afresh. Calls that must not synchronize (JAX callbacks, CUDA
graph capture) never tune: they use the cached choice, else DEFAULT_CLUSTER;
`cce_cupy.cuda.forward.tune()` fills the cache ahead of them. This module imports no launcher: the
launchers (cce_cupy.cuda.forward, cce_cupy.cuda.backward) import it.

Environment: CCE_CUPY_AUTOTUNE_CACHE (the file; default ~/.cache/cce_cupy/autotune.json, or under
$XDG_CACHE_HOME), CCE_CUPY_HOPPER_CLUSTER (1 or 2: use it, no tuning; unset or empty: tune).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from cce_cupy.cuda.sources import HOPPER_CLUSTERS, kernel_source

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: writers are not serialized
    fcntl = None

DEFAULT_CLUSTER = 1
TIMED_ROUNDS = 7  # after one untimed run of each candidate


def cache_path() -> Path:
    env = os.environ.get("CCE_CUPY_AUTOTUNE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cce_cupy" / "autotune.json"


@functools.cache
def kernel_version() -> str:
    from cce_cupy._version import __version__

    return f"{__version__}+{hashlib.sha1(kernel_source('lce_hopper.cu').encode()).hexdigest()[:12]}"


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (max(1, x) - 1).bit_length())


def tuning_key(gpu: str, dtype: str, n: int, d: int, v: int) -> str:
    """Shape class: N and V rounded up to powers of two (the grid's shape), D exact (the K loop)."""
    return f"{gpu}|{dtype}|N{_pow2_at_least(n)}|D{d}|V{_pow2_at_least(v)}|{kernel_version()}"


class TuningCache:
    """{key: choice} in memory, backed by a JSON file that other processes share.

    A bad file never breaks a call: an entry that is not one of HOPPER_CLUSTERS is dropped, and an
    unreadable file reads as empty. Writers merge under an flock on a sibling ".lock" file, so
    concurrent processes keep each other's entries.
    """

    def __init__(self, path: Path):
        self.path = path
        self._mem: dict[str, int] | None = None

    def _read_file(self) -> dict[str, int]:
        """The valid entries of the file ({} if there is none or it is unreadable)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):  # missing, not UTF-8 / JSON, nested too deep
            return {}
        if not isinstance(data, dict):
            return {}
        # bool is an int: reject it; Infinity, null, lists, dicts and other ints are not choices.
        return {
            k: v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool) and v in HOPPER_CLUSTERS
        }

    def _load(self) -> dict[str, int]:
        if self._mem is None:
            self._mem = self._read_file()
        return self._mem

    def get(self, key: str) -> int | None:
        return self._load().get(key)

    def put(self, key: str, value: int) -> None:
        """Record in memory, then merge into the file atomically (a failed write only loses the disk copy)."""
        self._load()[key] = value
        try:
            target = Path(os.path.realpath(self.path))  # write through a symlink, keep the link
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target.with_name(target.name + ".lock"), "a") as lock:
                if fcntl is not None:  # read-merge-write by one process at a time (POSIX)
                    fcntl.flock(lock, fcntl.LOCK_EX)
                on_disk = self._read_file()
                on_disk[key] = value
                _write_atomic(target, json.dumps(on_disk, indent=1, sort_keys=True))
        except OSError:
            pass

    def choose(self, key: str, candidates, time_candidate: Callable[[int], float]) -> int:
        """The cached choice for key; on a miss, the candidate with the least median time (then cached).

        time_candidate(c) runs candidate c once and returns its time. Each candidate runs once
        untimed, then the candidates take turns, in alternating order, for TIMED_ROUNDS rounds, so
        that clock and temperature drift during tuning does not favour one of them.
        """
        hit = self.get(key)
        if hit is not None:
            return hit
        candidates = list(candidates)
        times: dict[int, list[float]] = {cand: [] for cand in candidates}
        for cand in candidates:
            time_candidate(cand)
        for r in range(TIMED_ROUNDS):
            for cand in candidates if r % 2 == 0 else candidates[::-1]:
                times[cand].append(time_candidate(cand))
        best = min(candidates, key=lambda cand: sorted(times[cand])[len(times[cand]) // 2])
        self.put(key, best)
        return best


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` through a temporary file in its folder (removed if anything fails),
    keeping the file's mode; a new file gets 0644 less the umask, as open() gives it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@functools.cache
def _cache(path: str) -> TuningCache:
    return TuningCache(Path(path))


# Choices already found (cached or tuned), by the environment that names the cache file and the
# call's shape: each launch asks, and the file lookup costs ~40 us of host time per call.
_FOUND: dict[tuple, int] = {}


def hopper_cluster(
    gpu: str, dtype: str, n: int, d: int, v: int, time_candidate: Callable[[int], float] | None = None
) -> int:
    """CLUSTER for the Hopper kernels of this call: forced, cached, tuned (when time_candidate is
    given) or DEFAULT_CLUSTER."""
    forced = os.environ.get("CCE_CUPY_HOPPER_CLUSTER", "").strip()
    if forced:  # empty is unset
        allowed = [str(cl) for cl in HOPPER_CLUSTERS]
        if forced not in allowed:
            raise ValueError(
                f"CCE_CUPY_HOPPER_CLUSTER must be one of {', '.join(allowed)} (or unset, to tune), got {forced!r}"
            )
        return int(forced)
    memo = (os.environ.get("CCE_CUPY_AUTOTUNE_CACHE"), os.environ.get("XDG_CACHE_HOME"), gpu, dtype, n, d, v)
    found = _FOUND.get(memo)
    if found is not None:
        return found
    cache = _cache(str(cache_path()))
    key = tuning_key(gpu, dtype, n, d, v)
    if time_candidate is None:
        found = cache.get(key)
        if found is None:  # not memoized: a later tuning call may fill it
            return DEFAULT_CLUSTER
    else:
        found = cache.choose(key, HOPPER_CLUSTERS, time_candidate)
    _FOUND[memo] = found
    return found


def time_on_stream(run: Callable[[], None]) -> float:
    """Milliseconds of one run() on CuPy's current stream (synchronizes)."""
    import cupy

    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    run()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end)


__all__ = ["DEFAULT_CLUSTER", "TuningCache", "cache_path", "hopper_cluster", "kernel_version", "tuning_key"]
