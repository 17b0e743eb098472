"""Resident-memory caps for processes we start.

RLIMIT_AS is no cap for PhantomJS (it reserves about 2.2 GB of address space at idle), so the
cap is on resident memory: a memory cgroup of its own where the kernel lets us make one (v1 or
v2; the kernel then OOM-kills the process at the cap), else a watchdog that the provider polls
and that reports the process above its cap so it can be killed and restarted. Either way the
reason is kept: "oom" (the kernel's killer) or "memory" (our watchdog).
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("stickyproxy")

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(c) for c in f.read().split())
    except (OSError, ValueError):
        pass
    return found


def pss_of(pid: int) -> int | None:
    """Proportional set size: resident memory with shared pages divided among their users."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss_of(pid)


def tree_rss(pid: int) -> int | None:
    """Resident memory of a process and all its descendants (chromedriver and its Chromium).
    A lone process counts its RSS; a tree counts PSS, or Chromium's many processes would each
    count the same shared pages again."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        if current not in tree:
            tree.append(current)
            todo.extend(_children(current))
    if len(tree) == 1:
        return rss_of(pid)
    sizes = [s for s in map(pss_of, tree) if s is not None]
    return sum(sizes) if sizes else None


class Watchdog:
    """No kernel help: compare resident memory with the cap when polled."""

    kind = "watchdog"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pid: int | None = None

    def attach(self, pid: int) -> None:
        self.pid = pid

    def usage(self) -> int | None:
        return tree_rss(self.pid) if self.pid else None

    def over(self) -> bool:
        used = self.usage()
        return used is not None and used > self.limit

    def oom_kills(self) -> int:
        return 0

    def remove(self) -> None:
        self.pid = None


class Cgroup(Watchdog):
    """A memory cgroup of our own (v1 `memory.limit_in_bytes` or v2 `memory.max`)."""

    def __init__(self, path: str, version: int, limit: int) -> None:
        super().__init__(limit)
        self.path, self.version = path, version
        self.kind = f"cgroup-v{version}"
        if version == 1:
            self._write("memory.limit_in_bytes", limit)
            if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
                self._write("memory.memsw.limit_in_bytes", limit)  # no spilling into swap
        else:
            self._write("memory.max", limit)
            if os.path.exists(os.path.join(path, "memory.swap.max")):
                self._write("memory.swap.max", 0)

    def _write(self, name: str, value: int) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(value))

    def _read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def attach(self, pid: int) -> None:
        super().attach(pid)
        self._write("cgroup.procs", pid)

    def usage(self) -> int | None:
        try:
            return int(self._read("memory.usage_in_bytes" if self.version == 1 else "memory.current"))
        except (OSError, ValueError):
            return None

    def over(self) -> bool:
        return False  # the kernel enforces it

    def oom_kills(self) -> int:
        try:
            text = self._read("memory.oom_control" if self.version == 1 else "memory.events")
        except OSError:
            return 0
        m = re.search(r"^oom_kill (\d+)$", text, re.M)
        return int(m.group(1)) if m else 0

    def remove(self) -> None:
        super().remove()
        try:
            os.rmdir(self.path)
        except OSError as exc:
            log.debug("cgroup %s not removed: %s", self.path, exc)


def _own_cgroup_dirs() -> list[tuple[int, str]]:
    """Candidate parent directories (version, path) for our cgroups, v2 first."""
    mounts: dict[str, str] = {}
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                _, mnt, fstype, opts = line.split()[:4]
                if fstype == "cgroup2":
                    mounts.setdefault("v2", mnt)
                elif fstype == "cgroup" and "memory" in opts.split(","):
                    mounts.setdefault("v1", mnt)
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and "v2" in mounts:
            found.append((2, mounts["v2"] + path))
        elif "memory" in controllers.split(",") and "v1" in mounts:
            found.append((1, mounts["v1"] + path))
    return sorted(found)[::-1]  # v2 first


class NoCgroup(RuntimeError):
    pass


def make_cap(name: str, limit: int, mode: str = "auto") -> Watchdog:
    """A cgroup cap when one can be made here (mode auto or cgroup), else the watchdog."""
    if mode == "watchdog":
        return Watchdog(limit)
    for version, parent in _own_cgroup_dirs():
        path = os.path.join(parent, f"stickyproxy-{os.getpid()}-{name}")
        try:
            os.makedirs(path, exist_ok=True)
            if version == 2 and not os.path.exists(os.path.join(path, "memory.max")):
                os.rmdir(path)  # memory controller not delegated to us
                continue
            return Cgroup(path, version, limit)
        except OSError as exc:
            log.debug("no cgroup v%d at %s: %s", version, parent, exc)
            try:
                os.rmdir(path)
            except OSError:
                pass
    if mode == "cgroup":
        raise NoCgroup("--mem-enforce cgroup: no memory cgroup can be made here "
                       "(needs a writable cgroup v1 memory hierarchy or a delegated v2 subtree)")
    return Watchdog(limit)
