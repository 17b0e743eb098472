import subprocess
import sys

import pytest

from stickyproxy import config
from stickyproxy.config import ConfigError, build, parse_duration, parse_size


@pytest.mark.parametrize("text, seconds", [
    ("10s", 10), ("250ms", 0.25), ("5m", 300), ("1h", 3600), ("2", 2), (3, 3), ("1.5s", 1.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, size", [
    ("2g", 2 << 30), ("512m", 512 << 20), ("64k", 64 << 10), ("1.5GiB", 3 << 29), ("1024", 1024)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "ten seconds", "-1s", "5 parsecs"])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_defaults_run_the_local_pool():
    s = build({}, {}, {})
    assert s.listen == ("0.0.0.0", 8910) and s.stats_listen == ("0.0.0.0", 8911)
    assert s.local_count == 2 and s.mem_limit == 2 << 30
    assert (s.check_path, s.check_interval, s.check_timeout, s.fall, s.rise) == ("/status", 10, 20, 3, 2)


def test_a_backend_source_replaces_the_local_default():
    assert build({"backend": ["http://127.0.0.1:9000"]}, {}, {}).local_count == 0
    s = build({"backend": ["http://127.0.0.1:9000"], "local": "1"}, {}, {})
    assert s.local_count == 1 and s.backend == ("http://127.0.0.1:9000",)


def test_command_line_beats_environment_beats_file():
    file = {"check-interval": "1s", "fall": 5, "backend": ["http://a:1", "http://b:2"]}
    env = {"STICKYPROXY_CHECK_INTERVAL": "2s", "STICKYPROXY_RISE": "4"}
    s = build({"check_interval": "3s"}, env, file)
    assert (s.check_interval, s.rise, s.fall) == (3, 4, 5)
    assert s.backend == ("http://a:1", "http://b:2")
    assert build({}, {"STICKYPROXY_BACKEND": "http://a:1,http://c:3"}, {}).backend == (
        "http://a:1", "http://c:3")


@pytest.mark.parametrize("cli, env, file, message", [
    ({"check_interval": "soon"}, {}, {}, "--check-interval"),
    ({}, {"STICKYPROXY_MEM_LIMIT": "lots"}, {}, "STICKYPROXY_MEM_LIMIT"),
    ({}, {}, {"fall": 0}, "config file fall"),
    ({}, {}, {"colour": "blue"}, "unknown option 'colour'"),
    ({"backend": ["ftp://x"]}, {}, {}, "--backend"),
    # credentials would be shown on the stats port (and the message must not repeat them)
    ({"backend": ["http://user:pa55word@127.0.0.1:9"]}, {}, {}, r"--backend: credentials in a "
     r"backend URL are not supported \(they would be shown on the stats port\): "
     r"http://…@127\.0\.0\.1:9$"),
    ({"listen": "8910"}, {}, {}, "HOST:PORT"),
    ({"local": "0"}, {}, {}, "no backends"),
])
def test_bad_values_stop_with_a_message_naming_the_option(cli, env, file, message):
    with pytest.raises(ConfigError, match=message):
        build(cli, env, file)


def test_cli_exits_2_on_a_bad_value_and_says_why():
    run = subprocess.run([sys.executable, "-m", "stickyproxy", "serve", "--fall", "zero"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "--fall" in run.stderr


def test_cli_reads_a_toml_config_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("rise = [")
    run = subprocess.run([sys.executable, "-m", "stickyproxy", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "not TOML" in run.stderr


def test_the_readme_table_is_the_generated_one():
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert config.option_table() in readme


@pytest.mark.parametrize("taken", ["--listen", "--stats-listen"])
def test_cli_exits_2_when_a_port_is_taken_and_says_which(taken):
    import socket
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        busy = f"127.0.0.1:{holder.getsockname()[1]}"
        ports = {"--listen": "127.0.0.1:0", "--stats-listen": "127.0.0.1:0", taken: busy}
        run = subprocess.run([sys.executable, "-m", "stickyproxy", "serve",
                              "--backend", "http://127.0.0.1:9", *sum(ports.items(), ())],
                             capture_output=True, text=True, timeout=30)
    finally:
        holder.close()
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"cannot listen on {busy} ({taken}): Address already in use" in run.stderr
