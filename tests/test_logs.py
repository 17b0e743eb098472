"""The JSON log format is the text line parsed: same event, same fields."""

import io
import json
import logging

import pytest

from stickyproxy import config, logs
from stickyproxy.cli import parser


@pytest.mark.parametrize("line, event, fields", [
    ("SESSION_CREATED session=abc-1 backend=local-1", "SESSION_CREATED",
     {"session": "abc-1", "backend": "local-1"}),
    ('BACKEND_DOWN backend=local-2 check=timeout reason="no answer within 20s"', "BACKEND_DOWN",
     {"backend": "local-2", "check": "timeout", "reason": "no answer within 20s"}),
    ('PROXY_ERROR session=s backend=b reason="said "no" twice"', "PROXY_ERROR",
     {"session": "s", "backend": "b", "reason": 'said "no" twice'}),
    ("SESSION_ENDED session=s backend=b reason=idle", "SESSION_ENDED",
     {"session": "s", "backend": "b", "reason": "idle"}),
    ("DOCKER_ACTION action=start pool=p why='exited'", "DOCKER_ACTION",
     {"action": "start", "pool": "p", "why": "exited"}),
    ("BACKEND_MEMORY backend=local-1 rss=3 limit=2 action=kill", "BACKEND_MEMORY",
     {"backend": "local-1", "rss": "3", "limit": "2", "action": "kill"}),
    ('LOCAL_ENV_COSTLY var=V value="/x" browser=phantomjs reason="slow; start without it"',
     "LOCAL_ENV_COSTLY", {"var": "V", "value": "/x", "browser": "phantomjs",
                          "reason": "slow; start without it"}),
    ("ACCESS session=- backend=local-1 method=GET path=/status status=200 ms=0.4", "ACCESS",
     {"session": "-", "backend": "local-1", "method": "GET", "path": "/status", "status": "200",
      "ms": "0.4"}),
    ("STOPPING", "STOPPING", {}),
    ("cgroup /sys/fs/cgroup/x not removed: busy", "", {}),
])
def test_parse(line, event, fields):
    assert logs.parse(line) == (event, fields)


def test_json_lines_carry_event_fields_and_the_text():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JSONFormatter())
    logger = logging.getLogger("stickyproxy.test-logs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.warning('BACKEND_DOWN backend=%s check=%s reason="%s" level=%s', "local-1",
                       "refused", "connection refused", "x")
        logger.info("free text, not an event")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("CHECK_ERROR backend=%s", "local-1")
    finally:
        logger.removeHandler(handler)
    first, second, third = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["event"] == "BACKEND_DOWN" and first["level"] == "warning"
    assert first["reason"] == "connection refused" and first["check"] == "refused"
    assert first["field_level"] == "x"  # a field never overwrites the envelope
    assert first["message"].startswith("BACKEND_DOWN backend=local-1")
    assert first["ts"].endswith("Z")
    assert second["event"] == "LOG" and second["message"] == "free text, not an event"
    assert third["event"] == "CHECK_ERROR" and "ValueError: boom" in third["exception"]


@pytest.mark.parametrize("argv, expected", [([], False), (["--access-log"], True),
                                            (["--access-log", "false"], False),
                                            (["--access-log", "on"], True)])
def test_access_log_is_a_switch(argv, expected):
    args = parser().parse_args(["serve", "--backend", "http://127.0.0.1:1", *argv])
    assert config.build(vars(args), {}, {}).access_log is expected


def test_log_format_and_access_log_from_env_and_file():
    s = config.build({"backend": ["http://127.0.0.1:1"]},
                     {"STICKYPROXY_LOG_FORMAT": "json"}, {"access-log": True})
    assert (s.log_format, s.access_log) == ("json", True)
    with pytest.raises(config.ConfigError, match="--log-format"):
        config.build({"backend": ["http://127.0.0.1:1"], "log_format": "xml"}, {}, {})
    with pytest.raises(config.ConfigError, match="STICKYPROXY_ACCESS_LOG"):
        config.build({"backend": ["http://127.0.0.1:1"]}, {"STICKYPROXY_ACCESS_LOG": "maybe"}, {})
