"""Issue 10 for Docker: the deploy examples keep PhantomJS on a private network with no
published port, and the containers stickyproxy launches on a named network publish nothing."""

from __future__ import annotations

from pathlib import Path

import yaml

from stickyproxy.providers.docker import container_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def services(name):
    return yaml.safe_load((DEPLOY / name).read_text())["services"]


def test_compose_publishes_only_stickyproxy_and_keeps_phantomjs_private():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", name
        if name.startswith("phantomjs"):
            assert "ports" not in service and service["networks"] == ["grid"]
            assert service["mem_limit"] and service["memswap_limit"] == service["mem_limit"]
        else:
            assert {p.split(":")[-1] for p in service["ports"]} == {"8910", "8911"}
    assert set(compose["networks"]) == {"grid"}


def test_the_launcher_example_uses_a_named_network_not_host():
    (proxy,) = services("docker-compose.launcher.yml").values()
    flags = [a for a in proxy["command"] if a.startswith("--docker-network")]
    assert flags and flags[0].split("=", 1)[1] not in ("host", "")


def test_containers_on_a_named_network_publish_no_port():
    config = container_config(image="phantomjs", command=["phantomjs", "--webdriver=8910"],
                              name="p-0", port=8910, pool="p", slot=0, config="c",
                              environment={}, restart="always", init=True,
                              mem_limit=256 << 20, network="grid")
    assert config["network"] == "grid" and "network_mode" not in config
    assert "ports" not in config and "publish_all_ports" not in config
    assert config["mem_limit"] == config["memswap_limit"] == 256 << 20
    host = container_config(image="phantomjs", command=[], name="p-0", port=40000, pool="p",
                            slot=0, config="c", environment={}, restart="always", init=True,
                            mem_limit=None, network="host")
    assert host["network_mode"] == "host" and "mem_limit" not in host
