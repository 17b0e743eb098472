import pytest

from stickyproxy.health import DOWN, INIT, UP, Health


def run(health, outcomes):
    return [health.observe(ok) for ok in outcomes]


def test_new_backend_is_not_up_until_its_first_good_check():
    h = Health(rise=2, fall=3)
    assert h.state == INIT and not h.up
    assert h.observe(True) == UP


def test_a_new_backend_that_fails_is_down_and_needs_rise_successes():
    h = Health(rise=2, fall=3)
    assert h.observe(False) == DOWN
    assert run(h, [True]) == [None]
    assert run(h, [True]) == [UP]


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
    h.observe(False)
    assert run(h, [True, True, False, True, True]) == [None] * 5
    assert h.observe(True) == UP


def test_force_down_skips_the_count():
    h = Health(rise=2, fall=3)
    h.observe(True)
    assert h.force_down() == DOWN
    assert h.force_down() is None
    assert run(h, [True, True]) == [None, UP]
