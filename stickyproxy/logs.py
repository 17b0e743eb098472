"""Log output (issue 8): the text format people read and `--log-format json` for log shippers.

Every stickyproxy log line is an event of the README's vocabulary followed by `key=value` fields
(`SESSION_ENDED session=… backend=… reason=idle`). The JSON formatter does not change what is
logged: it parses that same line into one object per line, `{"ts", "level", "logger", "event",
<fields>..., "message"}`, so the two formats cannot drift apart. Field values stay strings, as in
the text line, so a shipper's field types never depend on one line's content.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"

_EVENT = re.compile(r"^([A-Z][A-Z0-9_]*)(?=\s|$)")
# A value is "quoted" (up to a quote followed by the next key or the end, so a quote inside a
# reason does not cut it short), 'quoted' (Python repr), or a bare run of non-spaces.
_FIELD = re.compile(r"""(?:^|\s)([A-Za-z_][\w.-]*)=(?:"(.*?)"(?=\s+[A-Za-z_][\w.-]*=|\s*$|:)"""
                    r"""|'(.*?)'(?=\s+[A-Za-z_][\w.-]*=|\s*$|:)|(\S*))""")
_RESERVED = ("ts", "level", "logger", "event", "message", "exception")


def parse(message: str) -> tuple[str, dict[str, str]]:
    """("EVENT", {key: value}) of one vocabulary line; ("", {}) for free text."""
    m = _EVENT.match(message)
    if not m:
        return "", {}
    fields: dict[str, str] = {}
    for f in _FIELD.finditer(message, m.end()):
        key = f.group(1)
        value = next((g for g in f.groups()[1:] if g is not None), "")
        fields[f"field_{key}" if key in _RESERVED else key] = value
    return m.group(1), fields


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, the line's fields, the whole text."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event, fields = parse(message)
        out = {"ts": datetime.fromtimestamp(record.created, timezone.utc)
                     .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": record.levelname.lower(),
               "logger": record.name,
               "event": event or "LOG",
               **fields,
               "message": message}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: str, fmt: str = "text", stream=None) -> None:
    """Configure the root logger once, for `stickyproxy serve`."""
    # Neither format shows them, and each record would look them up (the logging HOWTO's
    # "Optimization"): the caller's frame, thread, process and multiprocessing names.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
