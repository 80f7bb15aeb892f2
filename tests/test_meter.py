"""The worker's step meter: whole steps over full windows, medians, resets at a plan switch."""

import pytest

from fakes import Clock


def test_step_meter_reports_whole_steps_over_a_full_window_only(monkeypatch):
    import lepton.worker.meter as meter_module
    from lepton.worker.meter import StepMeter

    clock = Clock()  # processor time, advanced by the "work" below
    monkeypatch.setattr(meter_module.time, "process_time", clock)

    def burn(s):
        clock.t += s

    m = StepMeter(on_gpu=False, window=3)
    for i in range(5):
        m.begin()
        burn(2e-3)  # "compute window"
        m.record(10, 2e-3, 2e-3, 0.5e-3)
        burn(1e-3)  # reduction, update, loop: outside the window
        if i == 1:
            burn(20e-3)  # e.g. an evaluation: not a sample
            m.discard()
        if i == 3:
            burn(30e-3)  # one step that paid for something else (a GC)
        if i < 3:
            assert m.fields().get("step_busy_s", 0.0) == 0.0  # no full window yet
    m.begin()
    f = m.fields()
    assert f["step_samples"] == 10 and f["step_compute_s"] == pytest.approx(2e-3)
    # the whole step (3 ms), the discarded one left out, the outlier too (a median: a mean would be 13 ms)
    assert f["step_busy_s"] == pytest.approx(3e-3)
    beat = dict(f)
    m.reset()
    beat.update(m.fields())  # heartbeat fields are merged: the last plan's medians must not stay
    assert beat["step_busy_s"] == beat["step_samples"] == beat["step_compute_s"] == 0.0
    # a shorter first window (the starting shares are a guess); after a plan switch, full windows
    m = StepMeter(on_gpu=False, window=3, first_window=2)
    for _ in range(3):
        m.begin()
        m.record(10, 1e-3, 1e-3, 0.5e-3)
    assert m.full
    m.reset()
    for _ in range(3):
        m.begin()
        m.record(10, 1e-3, 1e-3, 0.5e-3)
    assert not m.full and len(m.steps) == 2  # the third step closes at the next begin()
    m.begin()
    assert m.full


def test_median_error_follows_the_spread_and_ignores_one_outlier():
    from lepton.worker.meter import median_error

    assert median_error([1.0] * 10) == 0.0 and median_error([1.0]) == 0.0
    steady = median_error([1.0, 1.1, 0.9, 1.0, 1.1, 0.9, 1.0, 1.1, 0.9, 1.0])
    assert 0.02 < steady < 0.1  # ~1.25 sigma / sqrt(10), sigma ~0.08
    assert median_error([1.0, 1.1, 0.9, 1.0, 1.1, 0.9, 1.0, 1.1, 0.9, 30.0]) == pytest.approx(steady, rel=0.5)
