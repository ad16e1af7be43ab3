"""The shared grid of periodic work (cluster/cadence.py)."""

import pytest

from cluster.cadence import EARLY, PHASE_SPAN, next_tick, phase_of, set_phase, until_next_tick


@pytest.mark.parametrize("now, period, expected", [
    (100.0, 0.5, 100.5),      # on a point: the next one
    (100.2, 0.5, 100.5),
    (100.49, 0.5, 101.0),     # woke EARLY before 100.5: that point counts as reached
    (100.51, 0.5, 101.0),
    (101.3, 1.0, 102.0),
    (103.0, 2.0, 104.0),
    (104.999, 5.0, 110.0),
])
def test_the_next_point_of_the_grid(now, period, expected):
    assert next_tick(now, period) == pytest.approx(expected)


def test_never_sooner_than_early_and_never_later_than_a_period_and_early():
    for step in range(2000):
        now = 1000.0 + step * 0.0137
        for period in (0.25, 0.5, 1.0, 2.0, 5.0):
            wait = until_next_tick(period, now)
            assert EARLY <= wait + 1e-9 and wait <= period + EARLY + 1e-9, (now, period, wait)


def test_loops_of_different_periods_meet_on_the_longer_ones_points():
    """A 0.5 s loop and a 2 s loop started at different moments wake together every 2 s."""
    def wakes(start, period, until):
        at, out = start, set()
        while True:
            at = next_tick(at, period)
            if at > until:
                return out
            out.add(round(at, 6))

    half, two = wakes(10.13, 0.5, 30.0), wakes(11.71, 2.0, 30.0)
    assert two and two <= half


def test_a_phase_shifts_the_grid_and_stays_within_its_span():
    assert next_tick(100.2, 0.5, phase=0.1) == pytest.approx(100.6)
    assert next_tick(100.55, 1.0, phase=0.1) == pytest.approx(101.1)
    phases = {phase_of(f"h1/worker-{i}") for i in range(8)}
    assert len(phases) == 8 and all(0 <= p < PHASE_SPAN for p in phases)


def test_a_process_phase_applies_to_every_wait():
    try:
        set_phase(0.2)
        assert until_next_tick(0.5, now=100.0) == pytest.approx(0.2)
        assert until_next_tick(1.0, now=100.3) == pytest.approx(0.9)
    finally:
        set_phase(0.0)


@pytest.mark.parametrize("count", [2, 3, 4, 8])
def test_processes_of_one_kind_are_spread_by_their_index(count):
    """The first ``count`` workers of a host sit at least SPAN/(2*count) apart on the
    circle of phases, whatever the host is called: a hash alone put two 45 ms apart."""
    for host in ("h1", "edge-a", "10.0.0.7"):
        phases = sorted(phase_of(f"{host}/worker-{i}") for i in range(count))
        gaps = [b - a for a, b in zip(phases, phases[1:], strict=False)]
        gaps.append(PHASE_SPAN - phases[-1] + phases[0])  # around the circle
        assert min(gaps) >= PHASE_SPAN / (2 * count)


def test_a_name_without_an_index_keeps_a_phase_of_its_own():
    assert phase_of("h1/dispatcher") != phase_of("h2/dispatcher")
    assert 0 <= phase_of("h1/dispatcher") < PHASE_SPAN
