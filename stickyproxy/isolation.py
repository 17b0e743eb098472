"""Keeping the backends stickyproxy starts off the network (issue 10).

PhantomJS 2.1.1 listens on 0.0.0.0 whatever `--webdriver` address it is given, so a local backend
would be reachable by anyone who reaches the host, bypassing the proxy. Here each one runs in a
network namespace of its own whose only interface is `lo`: nothing it listens on exists outside.

The relay (this module, run as `python -m stickyproxy.isolation relay`) has two halves:
- inside, beside the browser: serves a Unix socket (mode 0600, on the shared filesystem) that the
  proxy connects to (`BackendSpec.unix_socket`), one TCP connection to 127.0.0.1:PORT per Unix
  connection, so keep-alive and GhostDriver's connection limit behave as over direct TCP;
  a SOCKS5 server on 127.0.0.1:1080 for the browser's pages (PhantomJS `--proxy`); and, through
  an nft redirect, a trap for loopback addresses, which browsers never proxy;
- outside, in the host's namespace: makes the outgoing connections the inside asks for and hands
  them over as file descriptors, so pages reach what the host reaches, its loopback included.

root enters a new network namespace (`unshare(CLONE_NEWNET)`); any other user a user namespace as
well (uid mapped to 0 inside), which needs no privilege where unprivileged user namespaces are
enabled (`user.max_user_namespaces` > 0). No `unshare`, `ip` or `socat` binary is needed; `nft`
is, for pages on the host's loopback only (without it the reason says they are unreachable).
Where no namespace can be made (a container without CAP_SYS_ADMIN, user namespaces disabled),
`launch` starts the command on the host network as before and says why; the caller warns.

Owns: the probe, entering the namespace, the relay, starting a command that way. Leaves restarts,
memory caps and publishing backends to the providers. Pure helpers first, process code below.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
_SO_MARK, _TRAP_MARK = 36, 0x5350


# --- pure ------------------------------------------------------------------------------------

def attempts(euid: int) -> list[int]:
    """Namespace flags to try, best first. root needs no user namespace (and some hosts forbid
    them while root may still unshare the network); everyone else needs one to get the
    CAP_SYS_ADMIN that a network namespace takes."""
    if euid == 0:
        return [CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET]
    return [CLONE_NEWUSER | CLONE_NEWNET]


def describe(flags: int) -> str:
    if not flags:
        return "none"
    names = [name for bit, name in ((CLONE_NEWUSER, "user"), (CLONE_NEWNET, "net"))
             if flags & bit]
    return "+".join(names) + " namespace"


def id_map(inside: int, outside: int) -> str:
    """One line of /proc/PID/uid_map: `inside` maps to `outside`, a range of one id."""
    return f"{inside} {outside} 1\n"


def socket_path(rundir: str, name: str) -> str:
    return os.path.join(rundir, f"{name}.sock")


def relay_argv(python: str, flags: int, path: str, port: int, argv: Sequence[str]) -> list[str]:
    return [python, "-m", "stickyproxy.isolation", "relay", "--flags", str(flags),
            "--socket", path, "--port", str(port), "--", *argv]


def parse_report(line: bytes) -> tuple[str, str]:
    """One line the relay writes on its stdout: `pid N`, `note TEXT`, `ready`, `error TEXT`."""
    word, _, rest = line.decode(errors="replace").strip().partition(" ")
    return word, rest


EGRESS = "{egress}"  # in the command's arguments: replaced by host:port of the SOCKS5 way out
EGRESS_PORT = 1080
# PhantomJS's way out of its namespace (pages, DNS: Qt resolves names through the SOCKS5 proxy)
PHANTOMJS_EGRESS = (f"--proxy={EGRESS}", "--proxy-type=socks5")


def fill_egress(argv: Sequence[str], address: str) -> list[str]:
    return [arg.replace(EGRESS, address) for arg in argv]


def egress_port(command_port: int) -> int:
    """The SOCKS5 way out listens on a fixed port inside every namespace (each has its own
    ports), so a browser flag given elsewhere (Chromium's, in session capabilities) can name it."""
    return EGRESS_PORT if command_port != EGRESS_PORT else EGRESS_PORT + 1


def nft_rules(trap: int, keep: Sequence[int]) -> str:
    """Inside the namespace: send TCP for any other loopback port to the trap, which carries it
    to what listens there in the namespace (Chromium's DevTools port), else to the same address
    and port on the host. Browsers never proxy loopback addresses (Qt, like Chromium, bypasses
    them), so without this a page at http://127.0.0.1:PORT would be looked for in the namespace
    instead of on the host. The trap's own connections carry a mark and pass untouched."""
    ports = ", ".join(str(p) for p in sorted({trap, *keep}))
    return ("table ip stickyproxy {\n"
            "  chain out {\n"
            "    type nat hook output priority -100;\n"
            f"    meta mark != {_TRAP_MARK} ip daddr 127.0.0.0/8 tcp dport != {{ {ports} }} "
            f"redirect to :{trap}\n"
            "  }\n"
            "}\n")


def original_destination(raw: bytes) -> tuple[str, int]:
    """SO_ORIGINAL_DST's struct sockaddr_in: where a redirected connection was going."""
    port, address = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(address), port


def egress_request(rid: int, host: str, port: int) -> bytes:
    return f"{rid} {port} {host}".encode()


def parse_egress_request(msg: bytes) -> tuple[int, str, int]:
    rid, port, host = msg.decode().split(" ", 2)
    return int(rid), host, int(port)


def socks_reply(code: int) -> bytes:
    """RFC 1928 6: VER REP RSV ATYP=IPv4 BND.ADDR=0.0.0.0 BND.PORT=0."""
    return bytes([5, code, 0, 1]) + bytes(6)


def exit_code(returncode: int) -> int:
    """The relay exits as its command did; a signal N reads as 128+N, like a shell's `$?`."""
    return returncode if returncode >= 0 else 128 - returncode


def exposure_warning(ports: Sequence[int], reason: str, backend: str = "") -> str:
    """The log line for backends started unisolated, naming the ports open to the network."""
    listed = ",".join(str(p) for p in sorted(ports)) or "-"
    who = f"backend={backend} " if backend else ""
    return (f'ISOLATION_OFF {who}exposed_ports={listed} reason="{reason}" '
            f'detail="PhantomJS listens on 0.0.0.0: these ports are reachable from the network '
            f'unless a firewall blocks them"')


@dataclass(frozen=True)
class Isolation:
    """What the host allows, probed once at start-up: the namespace flags that work (0: none)."""

    flags: int
    reason: str

    @property
    def available(self) -> bool:
        return self.flags != 0


# --- inside the namespace (the relay process; also the probe) --------------------------------

def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """Before exec (and in the relay itself): SIGKILL when the parent dies, so nothing started
    here outlives a stickyproxy that was killed outright."""
    try:
        _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def enter(flags: int) -> None:
    """unshare(2) this (single-threaded) process into new namespaces; with a user namespace, map
    our uid/gid to 0 inside so the network namespace can be configured."""
    uid, gid = os.geteuid(), os.getegid()
    if _libc().unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({describe(flags)}): {os.strerror(err)}")
    if flags & CLONE_NEWUSER:
        for name, text in (("setgroups", "deny\n"), ("uid_map", id_map(0, uid)),
                           ("gid_map", id_map(0, gid))):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def loopback_up() -> None:
    """`ip link set lo up`, without iproute2: a new network namespace starts with `lo` down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        got = fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16sh22x", b"lo", 0))
        flags = struct.unpack("16sh", got[:18])[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | _IFF_UP))


def _probe_main() -> int:
    """Try each way in turn (a failed unshare changes nothing); print the flags that worked."""
    errors = []
    for flags in attempts(os.geteuid()):
        try:
            enter(flags)
            loopback_up()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                s.listen()
        except OSError as exc:
            errors.append(f"{describe(flags)}: {exc.strerror or exc}")
            continue
        print(f"ok {flags}")
        return 0
    print("error " + "; ".join(errors))
    return 1


class _Pipe(asyncio.Protocol):
    """One direction of a relayed connection; writes into `peer`, with flow control both ways."""

    def __init__(self, quickack: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []
        self.quickack = quickack
        self.sock = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sock = transport.get_extra_info("socket")

    def data_received(self, data: bytes) -> None:
        if self.quickack:
            # GhostDriver writes each header line as its own segment with Nagle on: without an
            # immediate ACK the next one waits for our delayed ACK, ~40 ms a response
            # (see upstream.py, which does the same on direct connections).
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                self.quickack = False
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None \
                and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Pipe):
    """The proxy's side: held paused until its own connection to the command is up."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.connecting: asyncio.Task | None = None  # held: the loop keeps only weak references

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, inner = await loop.create_connection(
                lambda: _Pipe(quickack=hasattr(socket, "TCP_QUICKACK")), "127.0.0.1", self.port)
        except OSError:
            self.transport.close()  # the proxy sees the connection close: backend down
            return
        inner.peer, self.peer = self, inner
        for data in self.pending:  # read before pause_reading took effect
            inner.transport.write(data)
        for data in inner.pending:  # nothing, unless the command spoke first
            self.transport.write(data)
        self.pending.clear()
        inner.pending.clear()
        if self.transport.is_closing():
            inner.transport.close()
            return
        self.transport.resume_reading()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        writer.close()


class _Egress:
    """Inside: asks the outside half of the relay for TCP connections made in the host's network
    namespace, which come back as file descriptors (SCM_RIGHTS over a socketpair)."""

    def __init__(self, ctl: socket.socket) -> None:
        self.ctl = ctl
        self.waiting: dict[int, asyncio.Future] = {}
        self.next_id = 0
        ctl.setblocking(False)
        asyncio.get_running_loop().add_reader(ctl, self._read)

    def _read(self) -> None:
        try:
            msg, fds, _, _ = socket.recv_fds(self.ctl, 4096, 1)
        except BlockingIOError:
            return
        if not msg:  # the outside half is gone: no more connections out
            asyncio.get_running_loop().remove_reader(self.ctl)
            for fut in self.waiting.values():
                fut.done() or fut.set_exception(OSError("egress closed"))
            return
        rid, _, rest = msg.decode().partition(" ")
        fut = self.waiting.pop(int(rid), None)
        if fds and (fut is None or fut.done()):
            os.close(fds[0])
        elif fds:
            fut.set_result(socket.socket(fileno=fds[0]))
        elif fut is not None and not fut.done():
            fut.set_exception(OSError(rest))

    async def connect(self, host: str, port: int) -> socket.socket:
        rid, self.next_id = self.next_id, self.next_id + 1
        fut = self.waiting[rid] = asyncio.get_running_loop().create_future()
        self.ctl.send(egress_request(rid, host, port))
        try:
            return await fut
        finally:
            self.waiting.pop(rid, None)


async def _socks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 egress: _Egress) -> None:
    """A SOCKS5 CONNECT server (RFC 1928, no authentication) on the namespace's loopback: the
    browser's way out, since its own namespace has no network."""
    try:
        version, count = await reader.readexactly(2)
        await reader.readexactly(count)
        if version != 5:
            return
        writer.write(b"\x05\x00")
        _, command, _, kind = await reader.readexactly(4)
        if kind == 1:
            host = socket.inet_ntop(socket.AF_INET, await reader.readexactly(4))
        elif kind == 4:
            host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
        else:
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
        port = int.from_bytes(await reader.readexactly(2), "big")
        if command != 1:
            writer.write(socks_reply(7))  # command not supported
            return
        try:
            out = await egress.connect(host, port)
        except OSError:
            writer.write(socks_reply(5))  # connection refused (or unreachable)
            return
        writer.write(socks_reply(0))
        out_reader, out_writer = await asyncio.open_connection(sock=out)
        try:
            await asyncio.gather(_pump(reader, out_writer), _pump(out_reader, writer))
        finally:
            out_writer.close()
    except (asyncio.IncompleteReadError, ConnectionError, UnicodeDecodeError):
        pass
    finally:
        writer.close()


async def _trapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   egress: _Egress) -> None:
    """A connection to the namespace's loopback that nft redirected: carry it to the host."""
    try:
        raw = writer.get_extra_info("socket").getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
        address, port = original_destination(raw)
        out = socket.socket()
        try:  # a server inside the namespace first (it never has the host's ports)
            out.setsockopt(socket.SOL_SOCKET, _SO_MARK, _TRAP_MARK)
            out.setblocking(False)
            await asyncio.get_running_loop().sock_connect(out, (address, port))
        except OSError:
            out.close()
            out = await egress.connect(address, port)
        out_reader, out_writer = await asyncio.open_connection(sock=out)
        try:
            await asyncio.gather(_pump(reader, out_writer), _pump(out_reader, writer))
        finally:
            out_writer.close()
    except OSError:
        pass
    finally:
        writer.close()


def _redirect_loopback(trap: int, keep: Sequence[int]) -> str:
    """Install `nft_rules` in this namespace; returns what the reason string should add."""
    nft = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft")
                                       if os.access(p, os.X_OK)), None)
    if nft is None:
        return "pages on the host's loopback unreachable (no nft)"
    done = subprocess.run([nft, "-f", "-"], input=nft_rules(trap, keep).encode(),
                          capture_output=True, timeout=10)
    if done.returncode != 0:
        return ("pages on the host's loopback unreachable (nft: "
                f"{done.stderr.decode(errors='replace').strip()[:200]})")
    return "host loopback forwarded"


async def _serve_inside(path: str, port: int, proc: subprocess.Popen, socks: socket.socket,
                        trap: socket.socket, ctl: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    egress = _Egress(ctl)
    out = await asyncio.start_server(lambda r, w: _socks(r, w, egress), sock=socks)
    trapped = await asyncio.start_server(lambda r, w: _trapped(r, w, egress), sock=trap)
    old = os.umask(0o177)  # the socket is born 0600: only our uid (and root) may connect
    try:
        server = await loop.create_unix_server(lambda: _Client(port), path)
    finally:
        os.umask(old)
    exited = loop.create_future()
    pidfd = os.pidfd_open(proc.pid)
    loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _forward, proc.pid, sig)
    sys.stdout.write("ready\n")
    sys.stdout.close()  # nothing more for the parent, which may stop reading
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        server.close()
        out.close()
        trapped.close()
        try:
            os.unlink(path)
        except OSError:
            pass
    return exit_code(proc.wait())


async def _dial(host: str, port: int, timeout: float = 30.0) -> socket.socket:
    loop = asyncio.get_running_loop()
    last: BaseException | None = None
    for family, kind, proto, _, address in await loop.getaddrinfo(host, port,
                                                                    type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, address)
            return sock
        except (OSError, TimeoutError) as exc:
            sock.close()
            last = exc
    raise OSError(f"cannot reach {host}:{port}: {last}")


async def _serve_outside(ctl: socket.socket, child: int) -> int:
    """Outside: make the connections the browser asks for; wait for the inside half."""
    loop = asyncio.get_running_loop()
    ctl.setblocking(False)
    tasks: set[asyncio.Task] = set()

    async def dial(msg: bytes) -> None:
        rid, host, port = parse_egress_request(msg)
        try:
            sock = await _dial(host, port)
        except OSError as exc:
            ctl.send(f"{rid} {exc}".encode())
            return
        try:
            socket.send_fds(ctl, [f"{rid} ok".encode()], [sock.fileno()])
        finally:
            sock.close()

    def readable() -> None:
        try:
            msg = ctl.recv(4096)
        except BlockingIOError:
            return
        if not msg:
            loop.remove_reader(ctl)
            return
        task = loop.create_task(dial(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_reader(ctl, readable)
    exited = loop.create_future()
    pidfd = os.pidfd_open(child)
    loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _forward, child, sig)
    await exited
    loop.remove_reader(pidfd)
    os.close(pidfd)
    return exit_code(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _listening(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _run(main) -> int:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _relay_main(argv: list[str]) -> int:
    """Two halves: this process stays in the host's namespaces to make outgoing connections; a
    forked child enters the new ones, starts the command there and serves the Unix socket."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m stickyproxy.isolation relay")
    parser.add_argument("--flags", type=int, required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)

    die_with_parent()
    if os.getppid() == 1:  # the parent died before the line above
        return 1
    outside, inside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = os.fork()
    if child == 0:
        outside.close()
        code = 1
        try:
            code = _inside_main(args, inside)
        finally:
            os._exit(code)
    inside.close()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # only the inside half reports: the launcher sees EOF when it is gone
    os.close(null)
    signal.signal(signal.SIGTERM, lambda *_: _forward(child, signal.SIGTERM))
    return _run(_serve_outside(outside, child))


def _inside_main(args, ctl: socket.socket) -> int:
    def report(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    die_with_parent()
    try:
        enter(args.flags)  # in a fresh fork, no thread exists: unshare(CLONE_NEWUSER) needs that
        loopback_up()
        try:
            os.unlink(args.socket)  # left by a relay that was SIGKILLed
        except FileNotFoundError:
            pass
        socks = socket.socket()
        socks.bind(("127.0.0.1", egress_port(args.port)))
        socks.listen(128)
        trap = socket.socket()
        trap.bind(("127.0.0.1", 0))
        trap.listen(128)
        note = _redirect_loopback(trap.getsockname()[1], (args.port, socks.getsockname()[1]))
        command = fill_egress(args.command, "127.0.0.1:%d" % socks.getsockname()[1])
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=2,  # our log
                                preexec_fn=die_with_parent)
    except OSError as exc:
        report(f"error {exc}")
        return 70
    report(f"pid {proc.pid}")
    report(f"note {note}")
    signal.signal(signal.SIGTERM, lambda *_: _forward(proc.pid, signal.SIGTERM))
    while not _listening(args.port):  # the launcher bounds this with its start timeout
        if proc.poll() is not None:
            report(f"error command exited with code {exit_code(proc.returncode)} at start")
            return exit_code(proc.returncode)
        time.sleep(0.02)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return _run(_serve_inside(args.socket, args.port, proc, socks, trap, ctl))


# --- in the proxy ----------------------------------------------------------------------------

def _relay_env(env: Mapping[str, str]) -> dict[str, str]:
    """The relay imports this package; make it importable whether or not it is installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return out


def probe(python: str = sys.executable, timeout: float = 10.0) -> Isolation:
    """Blocking (one short child process): call once at start-up, before the loop is busy."""
    try:
        done = subprocess.run([python, "-m", "stickyproxy.isolation", "probe"],
                              env=_relay_env(os.environ), capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Isolation(0, f"probe failed: {exc}")
    word, rest = parse_report(done.stdout.strip().splitlines()[-1] if done.stdout.strip()
                              else b"error " + done.stderr.strip()[-300:])
    if word == "ok":
        flags = int(rest)
        return Isolation(flags, f"own {describe(flags)}, reached over a Unix socket")
    return Isolation(0, f"no network namespace: {rest}")


def available() -> tuple[bool, str]:
    found = probe()
    return found.available, found.reason


@dataclass
class Isolated:
    """A started backend. `process` is what to wait on and signal (the relay, or the command
    itself when not isolated): the relay forwards SIGTERM, and SIGKILL on it takes the command
    too (PR_SET_PDEATHSIG). `pid` is the command's own, for memory caps and stats."""

    process: asyncio.subprocess.Process
    pid: int
    port: int
    unix_socket: str | None
    isolated: bool
    reason: str

    def stats(self) -> dict[str, object]:
        """For /stats, per backend: isolated or not, how or why not, the port left open."""
        return {"isolated": self.isolated, "isolation": self.reason,
                "exposed_port": None if self.isolated else self.port}


async def launch(argv: Sequence[str], port: int, rundir: str, env: Mapping[str, str], *,
                 isolation: Isolation, name: str, log: int | None = None,
                 start_timeout: float = 30.0,
                 on_pid: Callable[[int], None] | None = None) -> Isolated:
    """Start `argv` (which listens on 127.0.0.1:`port`) and return once it accepts connections.

    Isolated: the relay's Unix socket is `<rundir>/<name>.sock`; `port` is private to the
    namespace. Not isolated: the command runs on the host network and is reached on `port`.
    `log` is a file descriptor for the command's stdout and stderr. `on_pid` gets the command's
    pid as soon as it is known (to attach a memory cgroup before it grows). Raises OSError or
    TimeoutError after stopping whatever it started.
    """
    common = dict(stdin=asyncio.subprocess.DEVNULL, stderr=log, start_new_session=True,
                  preexec_fn=die_with_parent)
    if not isolation.available:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=log, env=dict(env), **common)
        if on_pid:
            on_pid(proc.pid)
        try:
            async with asyncio.timeout(start_timeout):
                await _wait_tcp(proc, port)
        except BaseException:
            await _terminate(proc)
            raise
        return Isolated(proc, proc.pid, port, None, False, isolation.reason)

    path = socket_path(rundir, name)
    proc = await asyncio.create_subprocess_exec(
        *relay_argv(sys.executable, isolation.flags, path, port, argv),
        stdout=asyncio.subprocess.PIPE, env=_relay_env(env), **common)
    pid, reason = 0, isolation.reason
    try:
        async with asyncio.timeout(start_timeout):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    code = await proc.wait()
                    raise OSError(f"isolation relay exited with code {code} at start")
                word, rest = parse_report(line)
                if word == "pid":
                    pid = int(rest)
                    if on_pid:
                        on_pid(pid)
                elif word == "note":
                    reason = f"{reason}; {rest}"
                elif word == "ready":
                    break
                elif word == "error":
                    raise OSError(rest)
    except TimeoutError:
        await _terminate(proc)
        raise TimeoutError(f"{argv[0]} did not listen within {start_timeout:g}s") from None
    except BaseException:
        await _terminate(proc)
        raise
    return Isolated(proc, pid, port, path, True, reason)


async def _wait_tcp(proc: asyncio.subprocess.Process, port: int) -> None:
    while True:  # ready when its port accepts a connection (Selenoid polls the same way)
        if proc.returncode is not None:
            raise OSError(f"exited with code {proc.returncode} at start")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)


async def _terminate(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    if proc.returncode is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            await proc.wait()


def main(argv: list[str]) -> int:
    if argv[:1] == ["probe"]:
        return _probe_main()
    if argv[:1] == ["relay"]:
        return _relay_main(argv[1:])
    print("usage: python -m stickyproxy.isolation probe | relay ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
