"""lora_ref.timing: the one interleaved timer of the chapters and the benchmarks."""

import pytest

from lora_ref import timing


def test_repetitions_are_interleaved_round_robin():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    t = timing.time_interleaved(fns, reps=3, target_rep_s=1.0, warmup=0)
    timed = order[-(3 * (t.calls["a"] + t.calls["b"])):]            # after calibration
    rep = ["a"] * t.calls["a"] + ["b"] * t.calls["b"]
    assert timed == rep * 3
    assert t.reps == 3 and all(len(s) == 3 for s in t.samples.values())


def test_a_slow_call_is_made_once_per_repetition():
    import time
    n, per_call = timing.calls_per_rep(lambda: time.sleep(0.02), target_rep_s=0.01)
    assert n == 1 and per_call >= 0.02


def test_max_seconds_cuts_repetitions_but_not_below_min_reps():
    import time
    t = timing.time_interleaved({"slow": lambda: time.sleep(0.01)}, reps=50, target_rep_s=0.001,
                                max_seconds=0.03, min_reps=2)
    assert 2 <= t.reps <= 3


def test_compare_ms_reports_milliseconds_of_the_slower_call():
    import time
    ms = timing.compare_ms({"sleep": lambda: time.sleep(0.004), "noop": lambda: None}, reps=3)
    assert ms["sleep"] >= 4.0 > 100 * ms["noop"]


@pytest.mark.parametrize("kwargs", [dict(reps=0), dict(min_reps=0), dict(target_rep_s=0)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="must be"):
        timing.time_interleaved({"a": lambda: None}, **kwargs)
    with pytest.raises(ValueError, match="at least one"):
        timing.compare_ms({})
