"""The pure parts of isolation: which namespaces to try, the relay's command line and reports."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from stickyproxy import isolation
from stickyproxy.isolation import CLONE_NEWNET, CLONE_NEWUSER, Isolation


@pytest.mark.parametrize("euid, expected", [
    (0, [CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET]),  # root: no user namespace needed
    (1000, [CLONE_NEWUSER | CLONE_NEWNET]),  # others need one to own the network namespace
    (65534, [CLONE_NEWUSER | CLONE_NEWNET]),
])
def test_attempts(euid, expected):
    assert isolation.attempts(euid) == expected


@pytest.mark.parametrize("flags, text", [
    (0, "none"),
    (CLONE_NEWNET, "net namespace"),
    (CLONE_NEWUSER | CLONE_NEWNET, "user+net namespace"),
])
def test_describe(flags, text):
    assert isolation.describe(flags) == text


def test_id_map_maps_one_id():
    assert isolation.id_map(0, 1000) == "0 1000 1\n"


def test_relay_argv_keeps_the_command_after_a_separator():
    argv = isolation.relay_argv("/py", CLONE_NEWNET, "/run/x/local-1.sock", 4444,
                                ["/bin/phantomjs", "--webdriver=127.0.0.1:4444", "--x"])
    assert argv == ["/py", "-m", "stickyproxy.isolation", "relay", "--flags", str(CLONE_NEWNET),
                    "--socket", "/run/x/local-1.sock", "--port", "4444", "--",
                    "/bin/phantomjs", "--webdriver=127.0.0.1:4444", "--x"]


def test_socket_path():
    assert isolation.socket_path("/run/sp", "local-3") == "/run/sp/local-3.sock"


@pytest.mark.parametrize("line, parsed", [
    (b"pid 123\n", ("pid", "123")),
    (b"ready\n", ("ready", "")),
    (b"error unshare(net namespace): Operation not permitted\n",
     ("error", "unshare(net namespace): Operation not permitted")),
    (b"", ("", "")),
])
def test_parse_report(line, parsed):
    assert isolation.parse_report(line) == parsed


@pytest.mark.parametrize("returncode, code", [(0, 0), (1, 1), (-9, 137), (-15, 143)])
def test_exit_code_reads_like_a_shell(returncode, code):
    assert isolation.exit_code(returncode) == code


def test_exposure_warning_names_the_ports_and_the_reason():
    line = isolation.exposure_warning([8912, 8911], "no network namespace: EPERM")
    assert line.startswith('ISOLATION_OFF exposed_ports=8911,8912 reason="no network namespace: '
                           'EPERM" ')
    assert isolation.exposure_warning([], "x").startswith("ISOLATION_OFF exposed_ports=- ")
    assert isolation.exposure_warning([4444], "x", backend="local-1").startswith(
        "ISOLATION_OFF backend=local-1 exposed_ports=4444 ")


def test_isolation_available_is_having_flags():
    assert Isolation(CLONE_NEWNET, "ok").available
    assert not Isolation(0, "no").available


@pytest.mark.parametrize("isolated, socket, exposed", [(False, None, 4444),
                                                      (True, "/run/local-1.sock", None)])
def test_isolated_stats_name_the_exposed_port(isolated, socket, exposed):
    got = isolation.Isolated(process=None, pid=1, port=4444, unix_socket=socket,  # type: ignore[arg-type]
                             isolated=isolated, reason="why")
    assert got.stats() == {"isolated": isolated, "isolation": "why", "exposed_port": exposed}


def test_relay_env_makes_the_package_importable():
    root = os.path.dirname(os.path.dirname(os.path.abspath(isolation.__file__)))
    assert isolation._relay_env({"A": "1"}) == {"A": "1", "PYTHONPATH": root}
    assert isolation._relay_env({"PYTHONPATH": "/x"})["PYTHONPATH"] == root + os.pathsep + "/x"


def test_fill_egress_replaces_the_placeholder_only():
    argv = ["/bin/phantomjs", "--webdriver=127.0.0.1:4444", *isolation.PHANTOMJS_EGRESS]
    assert isolation.fill_egress(argv, "127.0.0.1:5555") == [
        "/bin/phantomjs", "--webdriver=127.0.0.1:4444", "--proxy=127.0.0.1:5555",
        "--proxy-type=socks5"]


@pytest.mark.parametrize("host", ["example.org", "10.0.0.1", "::1", "a b"])
def test_egress_request_round_trips(host):
    assert isolation.parse_egress_request(isolation.egress_request(7, host, 443)) == (7, host, 443)


def test_socks_reply_is_rfc1928_with_an_empty_bound_address():
    assert isolation.socks_reply(0) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert isolation.socks_reply(5)[1] == 5


def test_egress_port_is_fixed_unless_the_command_took_it():
    assert isolation.egress_port(4444) == isolation.EGRESS_PORT == 1080
    assert isolation.egress_port(1080) == 1081


def test_nft_rules_redirect_every_other_loopback_port_to_the_trap():
    rules = isolation.nft_rules(5000, [4444, 1080])
    assert "type nat hook output priority -100;" in rules
    assert ("meta mark != 21328 ip daddr 127.0.0.0/8 tcp dport != { 1080, 4444, 5000 } "
            "redirect to :5000") in rules


def test_original_destination_reads_a_sockaddr_in():
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s", 8080, bytes([127, 0, 0, 2]))
    assert isolation.original_destination(raw + bytes(8)) == ("127.0.0.2", 8080)
