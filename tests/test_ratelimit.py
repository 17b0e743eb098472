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


def test_an_ipv6_client_counts_by_its_64():
    """A host is given a /64: counted per address, it could rotate past any limit."""
    limiter = RateLimiter(*parse_rate("1/m"))
    assert limiter.take("2001:db8:1:2::1", 0.0) == 0.0
    assert limiter.take("2001:db8:1:2:ffff::9", 0.0) > 0  # the same /64: the same bucket
    assert limiter.take("2001:db8:1:3::1", 0.0) == 0.0  # the next /64: another client
    assert limiter.take("::ffff:192.0.2.7", 0.0) == 0.0  # IPv4 over IPv6 is that IPv4 address
    assert limiter.take("192.0.2.7", 0.0) > 0


def test_a_flood_of_addresses_does_not_reset_everyone_s_limit():
    """When every bucket was busy the table was cleared, and with it the limit of the
    address that had just been refused: now the least recently used half goes."""
    limiter = RateLimiter(1 / 60, 1.0, max_clients=10)
    for i in range(9):  # busy addresses, seen a while ago
        limiter.take(f"192.0.2.{i}", 100.0 + i / 100)
    assert limiter.take("198.51.100.1", 101.0) == 0.0
    assert limiter.take("198.51.100.1", 101.0) > 0  # limited
    for i in range(9, 12):  # the table overflows
        limiter.take(f"192.0.2.{i}", 102.0)
    assert len(limiter._buckets) <= 10
    assert limiter.take("198.51.100.1", 102.0) > 0  # still limited
