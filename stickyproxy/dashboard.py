"""The stats port's `GET /` (issue 8): one HTML page an operator reads at a glance, like HAProxy's
stats page but about sessions. `render(snapshot)` is pure: it takes the dict `/stats` serves and
returns the page; the stats app serves it.

The page refreshes itself (meta refresh), fetches nothing (inline CSS, no script) and escapes every
value it shows: backend ids, URLs and check reasons come from outside.
"""

from __future__ import annotations

from html import escape
from typing import Any, Iterable, Mapping

REFRESH_SECONDS = 2

# What the state cell says and its colour class, most urgent first: a backend that is down is red
# even while drained; a drained one that is up is amber.
_STATE_CLASSES = {"up": "up", "down": "down", "init": "init", "drain": "drain"}

_CSS = """
body{font:13px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px;color:#1d2327;
background:#f6f7f7}
h1{font-size:18px;margin:0 0 4px}h2{font-size:14px;margin:18px 0 6px}
.sub{color:#646970;margin-bottom:10px}
.totals{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}
.tile{background:#fff;border:1px solid #dcdcde;border-radius:4px;padding:6px 12px;min-width:92px}
.tile b{display:block;font-size:20px}
.tile span{color:#646970;font-size:11px;text-transform:uppercase}
table{border-collapse:collapse;background:#fff;border:1px solid #c3c4c7}
th,td{padding:4px 8px;border-bottom:1px solid #e0e0e0;text-align:right;vertical-align:top}
th{background:#3c434a;color:#fff;font-weight:600;position:sticky;top:0}
td.l,th.l{text-align:left}
tfoot td{font-weight:700;background:#f0f0f1}
.small{display:block;color:#646970;font-size:11px;font-weight:400}
td.state{font-weight:700;text-align:left;color:#fff;min-width:110px}
td.state .small{color:rgba(255,255,255,.9)}
tr.down td{background:#fde8e8}tr.drain td{background:#fff6dc}tr.init td{background:#f0f0f1}
td.state.up{background:#1e8e3e}td.state.down{background:#c62828}td.state.init{background:#8c8f94}
td.state.drain{background:#e0a000;color:#1d2327}td.state.drain .small{color:#1d2327}
.bar{width:110px;height:8px;background:#e0e0e0;border-radius:4px;overflow:hidden;margin-top:3px}
.bar i{display:block;height:100%;background:#1e8e3e}.bar i.hot{background:#e0a000}
.bar i.full{background:#c62828}
.banner{background:#e0a000;padding:6px 10px;border-radius:4px;font-weight:700;margin:8px 0}
.empty{color:#646970;font-style:italic}
.grid{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _count(value: Any) -> str:
    n = _num(value)
    return "–" if n is None else f"{n:,.0f}"


def duration(seconds: Any) -> str:
    """3725 -> "1h 2m"; 42.5 -> "42s"; 0.25 -> "250ms"."""
    s = _num(seconds)
    if s is None:
        return "–"
    if s < 1:
        return f"{s * 1000:.0f}ms"
    s = int(s)
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {sec}s"
    return f"{sec}s"


def size(n: Any) -> str:
    value = _num(n)
    if value is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def state_class(row: Mapping[str, Any]) -> str:
    """The colour of a backend's state cell: down and init as they are; drain when it takes no
    new sessions; up otherwise."""
    state = str(row.get("state", ""))
    if state == "down":
        return "down"
    if state == "up":
        return "drain" if row.get("admin", "ready") != "ready" else "up"
    return "init"  # init, or a state this page does not know yet


def _memory(row: Mapping[str, Any]) -> str:
    """Used vs cap, from whichever keys the provider filled in (local: memory.rss_bytes /
    limit_bytes; Docker: memory.used_bytes / limit_bytes, or flat memory_used_bytes / ...)."""
    mem = row.get("memory")
    if isinstance(mem, Mapping):  # local: rss_bytes and the cap's kind; Docker: used_bytes
        used, cap, note = mem.get("rss_bytes", mem.get("used_bytes")), mem.get("limit_bytes"), \
            mem.get("cap")
    else:
        used, cap, note = row.get("memory_used_bytes"), row.get("memory_limit_bytes"), None
    used_n, cap_n = _num(used), _num(cap)
    if used_n is None and cap_n is None:
        return "–"
    text = f"{size(used)} / {size(cap)}" if cap_n else size(used)
    out = _e(text)
    if used_n is not None and cap_n:
        pct = min(100.0, 100.0 * used_n / cap_n)
        heat = "full" if pct >= 90 else "hot" if pct >= 70 else ""
        out += (f'<div class="bar" title="{pct:.0f}% of the cap">'
                f'<i class="{heat}" style="width:{pct:.1f}%"></i></div>')
    if note:
        out += f'<span class="small">{_e(note)}</span>'
    return out


def _restarts(row: Mapping[str, Any]) -> str:
    parts = []
    if "restarts" in row:
        parts.append(_count(row.get("restarts")))
    exits = row.get("exits")
    detail = []
    if isinstance(exits, Mapping):
        detail = [f"{k} {_count(v)}" for k, v in exits.items() if v]
    elif _num(exits):
        detail = [f"exited {_count(exits)}"]
    if _num(row.get("oom_kills")):
        detail.append(f"oom {_count(row['oom_kills'])}")
    if row.get("lost_total"):
        detail.append(f"lost {_count(row['lost_total'])}"
                      + (f" ({row['last_lost']})" if row.get("last_lost") else ""))
    out = parts[0] if parts else "–"
    if detail:
        out += f'<span class="small">{_e(", ".join(detail))}</span>'
    return out


def _state_cell(row: Mapping[str, Any]) -> str:
    cls = state_class(row)
    label = "DRAIN" if cls == "drain" else str(row.get("state") or "?").upper()
    check = row.get("last_check")
    detail = ""
    if isinstance(check, Mapping):
        detail = str(check.get("result") or "")
        if check.get("reason"):
            detail += f": {check['reason']}"
    elif cls == "init":
        detail = "no check yet"
    return (f'<td class="state l {cls}" data-state="{_e(cls)}">{_e(label)}'
            + (f'<span class="small">{_e(detail)}</span>' if detail else "") + "</td>")


def _admin_cell(row: Mapping[str, Any]) -> str:
    admin = str(row.get("admin") or "ready")
    extra = [str(row["drain_reason"])] if row.get("drain_reason") else []
    if row.get("replacement"):
        extra.append(f"replacement {row['replacement']}")
    return (f'<td class="l">{_e(admin)}'
            + (f'<span class="small">{_e("; ".join(extra))}</span>' if extra else "") + "</td>")


_KNOWN = {"id", "url", "source", "state", "admin", "drain_reason", "replacement", "capacity",
          "dialect", "sessions_active", "sessions_peak", "sessions_total", "sessions_ended",
          "requests_total", "errors_total", "connections", "last_check", "lost_total",
          "last_lost", "age_seconds", "restarts", "exits", "memory", "memory_used_bytes",
          "memory_limit_bytes", "memory_percent", "oom_kills"}


def _backend_cell(row: Mapping[str, Any]) -> str:
    """The id, then its URL and source; whatever else the provider reported (pid, container,
    image, log file) in the tooltip and one small line."""
    extras = {k: v for k, v in row.items() if k not in _KNOWN and v not in (None, "", {}, [])}
    container = extras.pop("container", None)
    if isinstance(container, Mapping):  # Docker: {id, name, image, state, port, ...}
        extras.update({f"container_{k}": v for k, v in container.items() if v not in (None, "")})
    tip = "\n".join(f"{k}: {v}" for k, v in extras.items())
    where = " · ".join(str(x) for x in (row.get("source"), row.get("url"), row.get("dialect"))
                       if x)
    brief = " · ".join(f"{k.replace('container_', '')} {extras[k]}" for k in
                       ("pid", "container_name", "image", "container_image", "container_state")
                       if k in extras)
    return (f'<td class="l backend" title="{_e(tip)}"><b>{_e(row.get("id"))}</b>'
            f'<span class="small">{_e(where)}</span>'
            + (f'<span class="small">{_e(brief)}</span>' if brief else "") + "</td>")


def _sessions_cell(row: Mapping[str, Any]) -> str:
    live, cap = row.get("sessions_active", 0), row.get("capacity")
    text = f'<b class="live">{_count(live)}</b>' + (f" / {_count(cap)}" if _num(cap) else "")
    peak = _count(row.get("sessions_peak"))
    return f'<td class="sessions">{text}<span class="small">peak {peak}</span></td>'


def _backend_row(row: Mapping[str, Any]) -> str:
    cls = state_class(row)
    conns = row.get("connections") or {}
    return (f'<tr class="{cls}" data-backend="{_e(row.get("id"))}">'
            + _backend_cell(row) + _state_cell(row) + _admin_cell(row) + _sessions_cell(row)
            + f'<td>{_count(row.get("sessions_total"))}</td>'
            + f'<td>{_count(row.get("requests_total"))}</td>'
            + f'<td>{_count(row.get("errors_total"))}</td>'
            + f'<td>{_count(conns.get("in_use"))}<span class="small">opened '
              f'{_count(conns.get("opened_total"))}</span></td>'
            + f"<td>{_memory(row)}</td>"
            + f"<td>{_restarts(row)}</td>"
            + f'<td>{_e(duration(row.get("age_seconds")))}</td>'
            + "</tr>")


def _tiles(snap: Mapping[str, Any]) -> str:
    backends = snap.get("backends") or []
    queue = snap.get("queue") or {}
    tiles = [
        ("backends up", f'{_count(snap.get("backends_up"))} / {len(backends)}'),
        ("live sessions", _count(snap.get("sessions_active"))),
        ("sessions total", _count(snap.get("sessions_total"))),
        ("queued", _count(queue.get("length")) if queue else "–"),
        ("requests", _count(snap.get("requests_total"))),
        ("errors", _count(snap.get("errors_total"))),
        ("recycled", _count(snap.get("recycled_total"))),
    ]
    return '<div class="totals">' + "".join(
        f'<div class="tile" data-tile="{_e(name)}"><b>{_e(value)}</b><span>{_e(name)}</span></div>'
        for name, value in tiles) + "</div>"


def _pairs_table(title: str, rows: Iterable[tuple[str, str]], cls: str) -> str:
    body = "".join(f'<tr><td class="l">{_e(k)}</td><td>{_e(v)}</td></tr>' for k, v in rows)
    if not body:
        body = '<tr><td class="l empty" colspan="2">none</td></tr>'
    return f'<div><h2>{_e(title)}</h2><table class="{cls}">{body}</table></div>'


def _queue(queue: Mapping[str, Any] | None) -> str:
    if not queue:
        return _pairs_table("Queue", [], "queue")
    waited = _num(queue.get("waited_total")) or 0
    mean = (_num(queue.get("wait_seconds_total")) or 0) / waited if waited else None
    return _pairs_table("Queue", [
        ("waiting now", f'{_count(queue.get("length"))} of {_count(queue.get("max_length"))}'),
        ("oldest waiting", duration(queue.get("oldest_wait_seconds")) if queue.get("length")
         else "–"),
        ("queued so far", _count(queue.get("waited_total"))),
        ("timed out", _count(queue.get("timeouts_total"))),
        ("client left", _count(queue.get("abandoned_total"))),
        ("refused (full)", _count(queue.get("refused_total"))),
        ("mean wait", duration(mean)),
        ("longest wait", duration(queue.get("wait_seconds_max"))),
    ], "queue")


def render(snapshot: Mapping[str, Any]) -> str:
    """The dashboard page for one snapshot (the dict `/stats` serves)."""
    snap = snapshot
    backends = snap.get("backends") or []
    rows = "".join(_backend_row(b) for b in backends) or (
        '<tr><td class="l empty" colspan="11">no backends yet</td></tr>')
    foot = ('<tfoot><tr><td class="l">total</td>'
            f'<td class="l">{_count(snap.get("backends_up"))} up</td><td></td>'
            f'<td><b>{_count(snap.get("sessions_active"))}</b></td>'
            f'<td>{_count(snap.get("sessions_total"))}</td>'
            f'<td>{_count(snap.get("requests_total"))}</td>'
            f'<td>{_count(snap.get("errors_total"))}</td>'
            '<td></td><td></td><td></td><td></td></tr></tfoot>')
    ended = [(reason, _count(n)) for reason, n in (snap.get("sessions_ended") or {}).items()]
    all_ended = sum(_num(n) or 0 for n in (snap.get("sessions_ended") or {}).values())
    ended.append(("all", _count(all_ended)))
    refused = [(reason, _count(n)) for reason, n in (snap.get("refused") or {}).items()]
    banner = ('<div class="banner">shutting down: no new sessions; live ones may finish</div>'
              if snap.get("shutting_down") else "")
    title = (f'stickyproxy · {_count(snap.get("backends_up"))}/{len(backends)} up · '
             f'{_count(snap.get("sessions_active"))} sessions')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>stickyproxy</h1>
<div class="sub">up {_e(duration(snap.get("uptime_seconds")))} · stats schema \
v{_e(snap.get("version"))} · refreshes every {REFRESH_SECONDS}s · <a href="/stats">/stats</a> \
· <a href="/metrics">/metrics</a></div>
{banner}{_tiles(snap)}
<h2>Backends</h2>
<table class="backends">
<thead><tr><th class="l">backend</th><th class="l">state · last check</th><th class="l">admin</th>
<th>live sessions</th><th>sessions total</th><th>requests</th><th>errors</th><th>connections</th>
<th>memory / cap</th><th>restarts</th><th>age</th></tr></thead>
<tbody>{rows}</tbody>
{foot}
</table>
<div class="grid">
{_queue(snap.get("queue"))}
{_pairs_table("Session ends by reason", ended, "ended")}
{_pairs_table("Refused at the door", refused, "refused")}
</div>
</body></html>
"""
