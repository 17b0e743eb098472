import pytest

from stickyproxy.providers import BackendSpec
from stickyproxy.providers.dns import Target, merge


@pytest.mark.parametrize("text, name, port", [
    ("phantomjs:8910", "phantomjs", 8910), ("tasks.phantom.:8910", "tasks.phantom", 8910),
    ("_webdriver._tcp.pool.svc.cluster.local", "_webdriver._tcp.pool.svc.cluster.local", None)])
def test_targets(text, name, port):
    assert Target.parse(text) == Target(name, port)


@pytest.mark.parametrize("bad", ["", "a:b:c", "name:port"])
def test_bad_targets(bad):
    with pytest.raises(ValueError):
        Target.parse(bad)


def test_merge_adds_marks_gone_and_keeps_on_failure():
    t = Target("pool", 8910)
    first = merge({}, {t: {("10.0.0.1", 8910), ("10.0.0.2", 8910)}})
    assert sorted(first) == ["dns-pool-10.0.0.1:8910", "dns-pool-10.0.0.2:8910"]
    assert first["dns-pool-10.0.0.1:8910"].url == "http://10.0.0.1:8910"
    second = merge(first, {t: {("10.0.0.2", 8910), ("10.0.0.3", 8910)}})
    assert second["dns-pool-10.0.0.1:8910"].meta["gone"] is True  # drains, not dropped
    assert not second["dns-pool-10.0.0.3:8910"].meta.get("gone")
    assert merge(second, {t: None}) == second  # a failed lookup changes nothing
    assert all(s.meta.get("gone") for s in merge(second, {t: set()}).values())  # an empty answer drains
    back = merge(second, {t: {("10.0.0.1", 8910)}})
    assert not back["dns-pool-10.0.0.1:8910"].meta.get("gone")


def test_ipv6_urls():
    spec = merge({}, {Target("v6", 80): {("::1", 80)}})["dns-v6-::1:80"]
    assert spec == BackendSpec("dns-v6-::1:80", "http://[::1]:80", "dns", meta={"dns": "v6"})
