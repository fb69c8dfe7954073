"""The certified filter's per-problem history (cce_cupy.cuda.filter_history): after a call that
certified under the threshold fraction, PROBE_EVERY - 1 exact calls, then a probe. CPU only."""

from __future__ import annotations

from cce_cupy.cuda.filter_history import PROBE_EVERY, FilterHistory


def _run(history, key, certified_fraction, calls):
    """Which of `calls` calls ran the filter, each filtered call certifying the given fraction."""
    used = []
    for _ in range(calls):
        use = history.use_filter(key)
        used.append(use)
        if use:
            history.record(key, 100, 100 - round(100 * certified_fraction))
    return used


def test_uncertified_problem_probes_once_every_probe_every_calls():
    h = FilterHistory()
    used = _run(h, "k", 0.1, 3 * PROBE_EVERY)
    assert [i for i, u in enumerate(used) if u] == [0, PROBE_EVERY, 2 * PROBE_EVERY]


def test_certified_problem_filters_every_call_and_at_the_threshold():
    h = FilterHistory()
    assert all(_run(h, "k", 0.9, 20))
    assert all(_run(h, "k", 0.5, 20))  # exactly half: pays (>= the threshold)


def test_problems_are_kept_apart_and_a_paying_probe_resumes_filtering():
    h = FilterHistory()
    assert _run(h, "a", 0.0, 2) == [True, False]
    assert _run(h, "b", 0.9, 2) == [True, True]  # another problem: its own history
    for _ in range(PROBE_EVERY - 2):
        assert not h.use_filter("a")
    assert _run(h, "a", 0.9, 3) == [True, True, True]  # the probe paid: filtering every call again


def test_no_rows_and_clear():
    h = FilterHistory()
    h.record("k", 0, 0)  # no row with a gradient: nothing says the filter does not pay
    assert h.use_filter("k")
    h.record("k", 10, 10)
    assert not h.use_filter("k")
    h.clear()
    assert h.use_filter("k")
