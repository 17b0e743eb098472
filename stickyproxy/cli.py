"""`stickyproxy serve`: flags, STICKYPROXY_* variables and `--config FILE` (TOML) -> Settings.

Exit codes: 0 after a clean stop (SIGINT/SIGTERM), 2 for a bad setting or a missing PhantomJS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tomllib

from . import config, logs
from .memcap import NoCgroup
from .providers.processes import PhantomJSNotFound


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="stickyproxy",
                                  description="A sticky load balancer for WebDriver servers.")
    commands = top.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy",
                                description="Every option is also STICKYPROXY_<NAME> in the "
                                            "environment and NAME in the --config TOML file.")
    serve.add_argument("--config", metavar="FILE", help="a TOML file of options")
    for f in config.options():
        default = f.metadata["shown"] or f.default
        switch = f.type in (bool, "bool")  # `--access-log` alone means on; a value may follow
        serve.add_argument(
            config.flag(f), dest=f.name, metavar=f.metadata["metavar"] or ("BOOL" if switch else None),
            action="append" if f.metadata["repeat"] else "store",
            **({"nargs": "?", "const": "true"} if switch else {}),
            help=f"{f.metadata['help']} (default: {default}; env {config.env_name(f)})")
    commands.add_parser("options", help="print the option table (Markdown)")
    hashing = commands.add_parser("hash-password",
                                  help="print a line for the --auth-users file (asks for the password)")
    hashing.add_argument("user")
    return top


def load_file(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise config.ConfigError(f"--config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise config.ConfigError(f"--config {path}: not TOML: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "options":
        print(config.option_table())
        return 0
    if args.command == "hash-password":
        import getpass
        from .auth import hash_password
        password = (getpass.getpass(f"password for {args.user}: ") if sys.stdin.isatty()
                    else sys.stdin.readline().rstrip("\n"))
        if not password or ":" in args.user:
            print("stickyproxy: need a user name without ':' and a non-empty password", file=sys.stderr)
            return 2
        print(f"{args.user}:{hash_password(password)}")
        return 0
    try:
        settings = config.build(vars(args), os.environ, load_file(args.config))
    except config.ConfigError as exc:
        print(f"stickyproxy: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format, sys.stderr)
    from .server import CannotListen, serve  # aiohttp loads only when serving

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        uvloop = None
    try:
        if uvloop:
            uvloop.run(serve(settings))
        else:
            asyncio.run(serve(settings))
    except (PhantomJSNotFound, NoCgroup, config.ConfigError, CannotListen) as exc:
        print(f"stickyproxy: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the Docker provider's DockerUnavailable / ImageUnavailable
        if type(exc).__name__ not in ("DockerUnavailable", "ImageUnavailable"):
            raise
        print(f"stickyproxy: {exc}", file=sys.stderr)
        return 2
    return 0
