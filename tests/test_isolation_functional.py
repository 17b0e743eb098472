"""Isolation on real PhantomJS (issue 10): every backend started through `isolation.launch` sits in
a network namespace of its own, nothing listens on its port in ours, and a WebDriver session works
over the relay's Unix socket. Checked for the user running the tests and, when that is root, for
root with a user namespace and for an unprivileged user (`nobody`, through setpriv).

No traffic goes to a non-loopback address: the proof is in the sockets and namespaces of the
processes (/proc/PID/ns/net, /proc/PID/net/tcp, psutil in our namespace).
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from stickyproxy import isolation
from stickyproxy.isolation import CLONE_NEWNET, CLONE_NEWUSER, Isolation
from stickyproxy.providers.processes import free_port
from stickyproxy.upstream import Upstream

pytestmark = pytest.mark.functional

ENV = dict(os.environ, OPENSSL_CONF="/dev/null")
PAGE_TITLE = "stickyproxy test page"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(isolation.__file__)))


@pytest.fixture(scope="module")
def probed() -> Isolation:
    found = isolation.probe()
    if not found.available:
        pytest.skip(f"this host allows no network namespace: {found.reason}")
    return found


@pytest.fixture
def hosted_page(pages) -> str | None:
    """The test page by a loopback host name, or None where this host has no such name."""
    name = loopback_name()
    return pages.replace("127.0.0.1", name) + "/index.html" if name else None


@pytest.fixture
def rundir():
    path = tempfile.mkdtemp(prefix="stickyproxy-iso-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def argv(binary: str, port: int) -> list[str]:
    return [binary, f"--webdriver=127.0.0.1:{port}", "--webdriver-loglevel=WARN",
            *isolation.PHANTOMJS_EGRESS]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def until(condition, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


def listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket in the network namespace of `pid`."""
    found = []
    for name in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{name}") as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A":  # TCP_LISTEN
                    address, port = local.split(":")
                    found.append((address, int(port, 16)))
    return found


def interfaces(pid: int) -> list[str]:
    with open(f"/proc/{pid}/net/dev") as f:
        return [line.split(":")[0].strip() for line in f.readlines()[2:]]


def host_listeners(port: int) -> list:
    """Listening sockets on `port` in *our* network namespace (psutil sees only this one)."""
    return [c for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]


def assert_isolated(phantom_pid: int, relay_pid: int, port: int) -> None:
    ours = os.readlink("/proc/self/ns/net")
    theirs = os.readlink(f"/proc/{phantom_pid}/ns/net")
    assert theirs != ours, "PhantomJS shares our network namespace"
    inner = psutil.Process(phantom_pid).ppid()  # the relay's inside half sits beside it
    assert psutil.Process(inner).ppid() == relay_pid
    assert os.readlink(f"/proc/{inner}/ns/net") == theirs
    # the outside half, in our namespace, only dials out for the browser: it listens on nothing
    assert os.readlink(f"/proc/{relay_pid}/ns/net") == ours
    assert [c for c in psutil.Process(relay_pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN] == []
    assert interfaces(phantom_pid) == ["lo"]
    # PhantomJS 2.1.1 binds 0.0.0.0 (issue 10): it does, but only in a namespace with just lo
    assert port in [p for _, p in listeners(phantom_pid)]
    assert host_listeners(port) == []
    assert (("00000000", port) not in listeners(os.getpid())
            and ("00000000000000000000000000000000", port) not in listeners(os.getpid()))


async def title_after_loading(up: Upstream, session: str, url: str) -> str:
    resp = await up.request("POST", f"/session/{session}/url",
                            [(b"Content-Type", b"application/json")],
                            json.dumps({"url": url}).encode(), timeout=30)
    await resp.read()
    resp.release()
    resp = await up.request("GET", f"/session/{session}/title", [], None, timeout=10)
    title = json.loads(await resp.read())["value"]
    resp.release()
    return title


def loopback_name() -> str | None:
    """A name of this host that resolves to a loopback address (Debian's /etc/hosts gives the
    host name 127.0.1.1), so a page on our loopback is named without a loopback literal."""
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        return None
    return name if addresses and all(a.startswith("127.") for a in addresses) else None


async def webdriver_session(unix_socket: str, port: int, page: str | None = None) -> None:
    """A real session over the relay, through the proxy's own client; `page` (served on the
    host's loopback, named by a host name) loads through the namespace's SOCKS5 way out."""
    up = Upstream(f"http://127.0.0.1:{port}", 4, unix_socket=unix_socket)
    try:
        resp = await up.request("POST", "/session", [(b"Content-Type", b"application/json")],
                                json.dumps({"desiredCapabilities": {}}).encode(), timeout=30,
                                replay_stale=True)
        body = json.loads(await resp.read())
        resp.release()
        assert resp.status == 200 and body["sessionId"], body
        session = body["sessionId"]
        for _ in range(3):  # reused connections: no 40 ms delayed-ACK stall on the inner leg
            started = time.perf_counter()
            resp = await up.request("GET", f"/session/{session}/url", [], None, timeout=10)
            assert json.loads(await resp.read())["value"] == "about:blank"
            resp.release()
        assert time.perf_counter() - started < 0.03
        if page:
            assert await title_after_loading(up, session, page) == PAGE_TITLE
        resp = await up.request("DELETE", f"/session/{session}", [], None, timeout=30)
        await resp.read()
        resp.release()
        assert resp.status == 200
    finally:
        up.close()


@pytest.mark.parametrize("flags", ["probed", "userns"])
async def test_isolated_backend_works_only_over_its_socket(probed, phantomjs_binary, rundir, flags,
                                                          hosted_page):
    if flags == "userns":
        if os.geteuid() != 0:
            pytest.skip("the probed mode already is user+net for a non-root user")
        probed = Isolation(CLONE_NEWUSER | CLONE_NEWNET, "user+net as root")
    port = free_port()
    pids = []
    got = await isolation.launch(argv(phantomjs_binary, port), port, rundir, ENV,
                                 isolation=probed, name="local-1", on_pid=pids.append)
    try:
        assert got.isolated and got.reason.startswith(probed.reason)
        assert pids == [got.pid] and got.pid != got.process.pid
        assert got.unix_socket == os.path.join(rundir, "local-1.sock")
        info = os.stat(got.unix_socket)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.geteuid()
        assert_isolated(got.pid, got.process.pid, port)
        await webdriver_session(got.unix_socket, port, hosted_page)
    finally:
        got.process.send_signal(signal.SIGTERM)  # forwarded to PhantomJS; the relay follows
        assert await asyncio.wait_for(got.process.wait(), 15) == 128 + signal.SIGTERM
    await until(lambda: not alive(got.pid), what="PhantomJS to exit")
    assert not os.path.exists(got.unix_socket)


async def test_pages_on_the_hosts_loopback_are_reached_through_nft(probed, phantomjs_binary,
                                                                   rundir, pages):
    """Browsers never proxy loopback addresses (Qt, like Chromium), so a page at
    http://127.0.0.1:PORT is redirected inside the namespace (nft) to the relay, which carries it
    to the host. Without nft the reason says so and such pages are out of reach."""
    port = free_port()
    got = await isolation.launch(argv(phantomjs_binary, port), port, rundir, ENV,
                                 isolation=probed, name="local-7")
    up = Upstream(f"http://127.0.0.1:{port}", 2, unix_socket=got.unix_socket)
    try:
        resp = await up.request("POST", "/session", [(b"Content-Type", b"application/json")],
                                json.dumps({"desiredCapabilities": {}}).encode(), timeout=30)
        session = json.loads(await resp.read())["sessionId"]
        resp.release()
        forwarded = got.reason.endswith("host loopback forwarded")
        assert forwarded or "unreachable" in got.reason
        expected = PAGE_TITLE if forwarded else ""
        assert await title_after_loading(up, session, pages + "/index.html") == expected
    finally:
        up.close()
        got.process.terminate()
        await got.process.wait()


async def test_killing_the_relay_takes_phantomjs_along(probed, phantomjs_binary, rundir):
    port = free_port()
    got = await isolation.launch(argv(phantomjs_binary, port), port, rundir, ENV,
                                 isolation=probed, name="local-2")
    got.process.kill()  # what processes.py does to a backend over its memory cap
    await got.process.wait()
    await until(lambda: not alive(got.pid), what="PR_SET_PDEATHSIG to kill PhantomJS")


async def test_relay_exits_as_phantomjs_did(probed, phantomjs_binary, rundir):
    port = free_port()
    got = await isolation.launch(argv(phantomjs_binary, port), port, rundir, ENV,
                                 isolation=probed, name="local-3")
    os.kill(got.pid, signal.SIGKILL)  # a crash: the provider must see it through the relay
    assert await asyncio.wait_for(got.process.wait(), 15) == 128 + signal.SIGKILL


async def test_a_command_that_dies_at_start_is_an_os_error(probed, rundir):
    with pytest.raises(OSError, match="exited with code 3 at start"):
        await isolation.launch(["/bin/sh", "-c", "exit 3"], free_port(), rundir, ENV,
                               isolation=probed, name="local-4")
    assert os.listdir(rundir) == []


async def test_a_command_that_never_listens_times_out_and_is_stopped(probed, rundir):
    pids = []
    with pytest.raises(TimeoutError, match="did not listen within 0.5s"):
        await isolation.launch(["/bin/sleep", "60"], free_port(), rundir, ENV,
                               isolation=probed, name="local-5", start_timeout=0.5,
                               on_pid=pids.append)
    assert len(pids) == 1
    await until(lambda: not alive(pids[0]), what="the command to be stopped")


async def test_without_isolation_the_command_runs_on_the_host_network(phantomjs_binary, rundir):
    port = free_port()
    got = await isolation.launch(argv(phantomjs_binary, port), port, rundir, ENV,
                                 isolation=Isolation(0, "no network namespace: test"),
                                 name="local-6")
    try:
        assert not got.isolated and got.unix_socket is None and got.pid == got.process.pid
        assert got.stats() == {"isolated": False, "isolation": "no network namespace: test",
                               "exposed_port": port}
        assert os.readlink(f"/proc/{got.pid}/ns/net") == os.readlink("/proc/self/ns/net")
        assert host_listeners(port)  # exposed: what ISOLATION_OFF warns about
    finally:
        got.process.terminate()
        await got.process.wait()


# --- an unprivileged user (needs root to become one) --------------------------------------

DRIVER = """
import asyncio, json, os, sys
from stickyproxy import isolation
binary, port, rundir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
async def main():
    found = isolation.probe(sys.executable)
    got = await isolation.launch([binary, f"--webdriver=127.0.0.1:{port}",
                                  *isolation.PHANTOMJS_EGRESS], port, rundir,
                                 dict(os.environ, OPENSSL_CONF="/dev/null"), isolation=found,
                                 name="local-1", log=2)
    print(json.dumps({"flags": found.flags, "reason": found.reason, "relay": got.process.pid, "pid": got.pid,
                      "socket": got.unix_socket, "isolated": got.isolated}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    got.process.terminate()
    print(json.dumps({"code": await got.process.wait()}), flush=True)
asyncio.run(main())
"""


def _python_for(user: list[str]) -> str | None:
    """A Python 3.11+ that `user` can run, and that can start itself again for the relay (a pyenv
    under /root is not reachable by others)."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            done = subprocess.run([*user, python, "-c", "import subprocess, sys; "
                                   "assert sys.version_info >= (3, 11); "
                                   "subprocess.run([sys.executable, '-c', 'import asyncio'], "
                                   "check=True)"],
                                  capture_output=True, timeout=30)
        except OSError:
            continue
        if done.returncode == 0:
            return python
    return None


@pytest.fixture(scope="module")
def nobody(phantomjs_binary):
    """setpriv into nobody, with a PhantomJS copy and a run directory that nobody can use."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run as another user")
    user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
    python = _python_for(user)
    if python is None:
        pytest.skip("no Python that nobody can run")
    shared = tempfile.mkdtemp(prefix="stickyproxy-iso-nobody-")
    os.chmod(shared, 0o755)
    binary = os.path.join(shared, "phantomjs")
    shutil.copyfile(phantomjs_binary, binary)
    os.chmod(binary, 0o755)
    rundir = os.path.join(shared, "run")
    os.mkdir(rundir, 0o700)
    uid = pwd.getpwnam("nobody").pw_uid
    os.chown(rundir, uid, grp.getgrnam("nogroup").gr_gid)
    yield user, python, binary, rundir, uid
    shutil.rmtree(shared, ignore_errors=True)


async def test_an_unprivileged_user_gets_a_user_and_network_namespace(nobody, hosted_page):
    user, python, binary, rundir, uid = nobody
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *user, python, "-c", DRIVER, binary, str(port), rundir, cwd="/",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env=dict(ENV, PYTHONPATH=ROOT))
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, "the driver exited before launching"
        got = json.loads(line)
        assert got["isolated"], got["reason"]
        assert got["flags"] == CLONE_NEWUSER | CLONE_NEWNET
        assert psutil.Process(got["pid"]).uids().real == uid
        assert os.readlink(f"/proc/{got['pid']}/ns/user") != os.readlink("/proc/self/ns/user")
        info = os.stat(got["socket"])
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (uid, 0o600)
        assert_isolated(got["pid"], got["relay"], port)
        await webdriver_session(got["socket"], port, hosted_page)  # root may use nobody's socket
        proc.stdin.close()
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert json.loads(line) == {"code": 128 + signal.SIGTERM}
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await until(lambda: not alive(got["pid"]), what="PhantomJS to exit")
    finally:
        if proc.returncode is None:
            proc.kill()  # the relay and PhantomJS follow through PR_SET_PDEATHSIG
            await proc.wait()
