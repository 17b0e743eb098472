import pytest

from stickyproxy.ratelimit import RateLimiter, parse_rate


@pytest.mark.parametrize("text, rate, burst", [
    ("5/s", 5, 5), ("120/m", 2, 120), ("3600/h", 1, 3600), ("off", 0, 0), ("0", 0, 0)])
def test_parse_rate(text, rate, burst):
    assert parse_rate(text) == (rate, burst)


@pytest.mark.parametrize("bad", ["fast", "5", "-1/s", "5/day"])
def test_bad_rates(bad):
    with pytest.raises(ValueError):
        parse_rate(bad)


def test_burst_then_steady_rate_per_address():
    limiter = RateLimiter(*parse_rate("2/s"))
    assert [limiter.take("a", 0.0) for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("a", 0.0) == pytest.approx(0.5)
    assert limiter.take("b", 0.0) == 0.0  # another address has its own bucket
    assert limiter.take("a", 0.5) == 0.0  # refilled one token


def test_off_never_limits():
    limiter = RateLimiter(*parse_rate("off"))
    assert all(limiter.take("a", 0.0) == 0.0 for _ in range(1000))


def test_the_table_of_addresses_is_bounded():
    limiter = RateLimiter(1.0, 1.0, max_clients=10)
    for i in range(100):
        limiter.take(f"10.0.0.{i}", float(i))
    assert len(limiter._buckets) <= 10
