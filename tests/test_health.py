import pytest

from stickyproxy.health import DOWN, INIT, UP, Health, next_wait


def run(health, outcomes):
    return [health.observe(ok) for ok in outcomes]


def test_new_backend_is_not_up_until_its_first_good_check():
    h = Health(rise=2, fall=3)
    assert h.state == INIT and not h.up
    assert h.observe(True) == UP


def test_a_new_backend_that_fails_while_starting_is_up_at_its_first_good_check():
    h = Health(rise=3, fall=3)
    assert h.observe(False) == DOWN  # shown as down, with the check's reason, while it starts
    assert run(h, [False, False]) == [None, None]
    assert h.observe(True) == UP  # no history to distrust: rise does not apply yet


def test_once_up_a_backend_needs_rise_successes_again():
    h = Health(rise=2, fall=1)
    h.observe(False)
    h.observe(True)
    assert h.observe(False) == DOWN
    assert run(h, [True, True]) == [None, UP]


def test_checks_come_sooner_while_a_backend_starts_and_back_off_to_the_interval():
    waits, wait = [], None
    for _ in range(8):
        wait = next_wait(wait, 10.0, starting=True)
        waits.append(wait)
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert next_wait(0.5, 10.0, starting=False) == 10.0  # up once: the interval, always
    assert next_wait(None, 0.1, starting=True) == 0.1  # never slower than the interval itself


@pytest.mark.parametrize("rise, fall", [(1, 1), (2, 3), (3, 2), (5, 5)])
def test_fall_failures_take_it_down_and_rise_successes_bring_it_back(rise, fall):
    h = Health(rise=rise, fall=fall)
    h.observe(True)
    assert h.up
    assert run(h, [False] * (fall - 1)) == [None] * (fall - 1)
    assert h.up  # tolerant: a slow PhantomJS may fail a check or two
    assert h.observe(False) == DOWN
    assert run(h, [True] * (rise - 1)) == [None] * (rise - 1)
    assert h.observe(True) == UP


def test_only_consecutive_failures_count():
    h = Health(rise=2, fall=3)
    h.observe(True)
    assert run(h, [False, False, True, False, False]) == [None] * 5
    assert h.up  # HAProxy's counter would have taken it down here
    assert h.observe(False) == DOWN


def test_only_consecutive_successes_count():
    h = Health(rise=3, fall=1)
    h.observe(True)
    h.observe(False)
    assert run(h, [True, True, False, True, True]) == [None] * 5
    assert h.observe(True) == UP


def test_force_down_skips_the_count():
    h = Health(rise=2, fall=3)
    h.observe(True)
    assert h.force_down() == DOWN
    assert h.force_down() is None
    assert run(h, [True, True]) == [None, UP]
