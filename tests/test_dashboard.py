"""The HTML dashboard is a pure function of a snapshot: literal snapshots in, page text out."""

import copy
import re
from html.parser import HTMLParser

from stickyproxy import dashboard

from snapshots import HOSTILE, SNAPSHOT


class _Cells(HTMLParser):
    """Rows of the backends table as {backend id: {"class": row class, "text": [cell texts],
    "state": state cell class}}, and every tag seen (to prove nothing hostile became markup)."""

    def __init__(self):
        super().__init__()
        self.rows, self.tags, self._row, self._cell = {}, [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "tr" and "data-backend" in attrs:
            self._row = self.rows[attrs["data-backend"]] = {"class": attrs.get("class"),
                                                            "text": [], "state": None}
        elif tag == "td" and self._row is not None:
            self._cell = []
            self._row["text"].append(self._cell)
            if "data-state" in attrs:
                self._row["state"] = attrs["data-state"]

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._cell is not None and self._row is not None:
            self._cell.append(data)


def parse(page: str) -> _Cells:
    parser = _Cells()
    parser.feed(page)
    for row in parser.rows.values():
        row["text"] = [" ".join(" ".join(c).split()) for c in row["text"]]
    return parser


def test_one_row_per_backend_with_its_state_coloured():
    cells = parse(dashboard.render(SNAPSHOT))
    assert list(cells.rows) == [b["id"] for b in SNAPSHOT["backends"]]
    states = {bid: row["state"] for bid, row in cells.rows.items()}
    assert states == {"local-1": "up", "local-2": "drain", HOSTILE: "down", "docker-1": "init"}
    local1 = cells.rows["local-1"]["text"]
    assert local1[0].startswith("local-1")
    assert local1[1] == "UP ok: HTTP 200 in 2 ms"
    assert local1[3] == "3 / 4 peak 4"  # live / capacity, peak
    assert local1[4:7] == ["17", "412", "1"]  # sessions total, requests, errors
    assert local1[8].startswith("44.3 MiB / 2.0 GiB")
    assert local1[9] == "1 oom 1, lost 1 (oom)"
    assert local1[10] == "1h 2m"


def test_drain_shows_its_reason_and_replacement():
    row = parse(dashboard.render(SNAPSHOT)).rows["local-2"]["text"]
    assert row[1].startswith("DRAIN")
    assert row[2] == "drain recycling: 100 sessions; replacement local-3"


def test_docker_keys_are_rendered_as_they_are():
    row = parse(dashboard.render(SNAPSHOT)).rows["docker-1"]["text"]
    assert "name stickyproxy-1 · image phantomjs:2.1 · state running" in row[0]
    assert row[1] == "INIT no check yet"
    assert row[8] == "100.0 MiB / 512.0 MiB"
    assert row[9] == "2 oom 1, exited 3, oom 1"  # exits by reason, then OOM kills


def test_flat_memory_keys_are_read_too():
    flat = {"id": "d", "state": "up", "memory_used_bytes": 1 << 20, "memory_limit_bytes": 4 << 20,
            "exits": 2}
    row = parse(dashboard.render({"backends": [flat]})).rows["d"]["text"]
    assert row[8] == "1.0 MiB / 4.0 MiB" and row[9] == "– exited 2"


def test_hostile_ids_and_reasons_are_escaped():
    page = dashboard.render(SNAPSHOT)
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    cells = parse(page)
    assert "script" not in cells.tags
    assert cells.rows[HOSTILE]["text"][1] == f"DOWN refused: {HOSTILE}"  # shown as text
    assert "http://127.0.0.1:9/<b>" in cells.rows[HOSTILE]["text"][0]


def test_queue_ends_and_totals():
    page = dashboard.render(SNAPSHOT)
    text = " ".join(re.sub(r"<[^>]+>", " ", page).split())
    assert "waiting now 2 of 100" in text
    assert "oldest waiting 1s" in text
    assert "refused (full) 3" in text
    assert "mean wait 500ms" in text
    assert "client_delete 110" in text and "backend_oom 1" in text and "all 118" in text
    assert "total 2 up 4 122 1,352 8" in text
    assert "Refused at the door auth 4 body_too_large 0 rate 2" in text


def test_refreshes_itself_and_fetches_nothing():
    page = dashboard.render(SNAPSHOT)
    assert '<meta http-equiv="refresh" content="2">' in page
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page


def test_an_empty_or_partial_snapshot_still_renders():
    page = dashboard.render({"version": 1, "backends": [], "queue": None})
    assert "no backends yet" in page
    partial = copy.deepcopy(SNAPSHOT)
    for row in partial["backends"]:
        for key in ("memory", "last_check", "connections", "exits", "restarts"):
            row.pop(key, None)
    partial["shutting_down"] = True
    page = dashboard.render(partial)
    assert "shutting down" in page and len(parse(page).rows) == 4


def test_units():
    assert dashboard.duration(0.25) == "250ms"
    assert dashboard.duration(42.5) == "42s"
    assert dashboard.duration(125) == "2m 5s"
    assert dashboard.duration(90061) == "1d 1h"
    assert dashboard.size(512) == "512 B"
    assert dashboard.size(3 << 30) == "3.0 GiB"
