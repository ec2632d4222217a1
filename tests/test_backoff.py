"""metis_stream.backoff: delays that double up to a cap, with jitter."""

from __future__ import annotations

from metis_stream.backoff import Backoff


def test_delays_double_up_to_the_cap_each_between_half_and_all_of_it():
    backoff = Backoff(base=0.1, cap=1.0)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    for ceiling in ceilings:
        delay = backoff.next_delay()
        assert ceiling / 2 <= delay <= ceiling
    assert backoff.attempt == len(ceilings)


def test_jitter_spreads_the_delays():
    delays = {Backoff(base=1.0, cap=1.0).next_delay() for _ in range(50)}
    assert len(delays) > 40  # not all waiting in step


def test_reset_starts_again_from_the_base():
    backoff = Backoff(base=0.5, cap=30.0)
    for _ in range(6):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() <= 0.5
