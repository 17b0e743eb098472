from stickyproxy.providers.labels import engine_host, specs_for
from stickyproxy.server import spread


def container(name, labels, state="running", mode="bridge"):
    return {"Id": name * 12, "Names": [f"/{name}"], "Labels": labels, "State": state,
            "HostConfig": {"NetworkMode": mode}}


def test_labelled_running_containers_become_backends():
    listing = [
        container("a", {"stickyproxy.port": "8910"}, mode="host"),
        container("b", {"stickyproxy.port": "8910"}),
        container("c", {"stickyproxy.port": "9000", "stickyproxy.url": "http://phantom-c:9000/"}),
        container("d", {"stickyproxy.port": "8910"}, state="exited"),
        container("e", {"stickyproxy.port": "8910", "stickyproxy.pool": "mine"}),  # a launcher's
        container("f", {"stickyproxy.port": "nope"}),
    ]
    specs = specs_for(listing, "127.0.0.1", "labels-e1")
    assert {k: s.url for k, s in specs.items()} == {
        "labels-e1-a": "http://127.0.0.1:8910", "labels-e1-b": "http://b:8910",
        "labels-e1-c": "http://phantom-c:9000"}
    assert specs["labels-e1-a"].source == "labels-e1"


def test_engine_hosts():
    assert engine_host(None) == "127.0.0.1"
    assert engine_host("unix:///run/docker.sock") == "127.0.0.1"
    assert engine_host("tcp://docker-2.internal:2375") == "docker-2.internal"


def test_containers_spread_evenly_over_engines():
    assert spread(5, ["a", "b"]) == [("a", 3), ("b", 2)]
    assert spread(1, ["a", "b", "c"]) == [("a", 1), ("b", 0), ("c", 0)]
    assert spread(4, [None]) == [(None, 4)]
