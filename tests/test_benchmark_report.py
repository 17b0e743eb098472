"""The committed benchmark table is what its committed figures render to.

benchmarks/RESULTS.json is the full run's machine-readable result; RESULTS.md was rendered from it
by benchmarks/report.py. Rendering again catches a report change that breaks the table (a field
read from the wrong dict printed "None s" here once) and a table edited by hand.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import report

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_results_md_is_the_rendering_of_results_json():
    results = json.loads((BENCH / "RESULTS.json").read_text())
    assert report.markdown(results) == (BENCH / "RESULTS.md").read_text()


def test_every_part_states_its_measuring_window():
    md = (BENCH / "RESULTS.md").read_text()
    assert not re.search(r"\bNone\b", md)
    meta = json.loads((BENCH / "RESULTS.json").read_text())["meta"]
    assert f"for one {meta['restarts_window_s']} s window" in md
    rounds = meta.get("docker_rounds", meta["e2e_rounds"])  # (its own since d25dcc3)
    assert f"{rounds} round(s) of {meta['docker_window_s']} s each" in md


def _run(sessions_per_s, proxy_cpu, failed=0):
    return {"sessions_per_s": sessions_per_s, "failed": failed,
            "cpu_ms_per_session": {"proxy": proxy_cpu}}


def test_paired_ratios_are_medians_within_rounds_and_skip_rounds_that_did_not_run():
    from benchmarks.e2e import paired_row

    row = paired_row(8, 6.0, {
        "stickyproxy": [_run(150, 1.2), _run(160, 1.3), {"error": "RuntimeError: no client"},
                        _run(155, 1.25, failed=2)],
        "haproxy-close": [_run(150, 1.0), _run(150, 1.0), _run(140, 1.0), _run(170, 1.0)],
        "direct": [_run(170, 0), _run(175, 0), _run(160, 0), _run(165, 0)]})
    assert row["vs_haproxy"]["ratios"] == [1.0, 1.067, 0.912]  # round 3 has no stickyproxy run
    assert row["vs_haproxy"]["ratio"] == 1.0 and row["vs_haproxy"]["cpu_ratio"] == 1.25
    assert row["vs_direct"]["ratio"] == pytest.approx(0.914, abs=5e-4)  # kept unrounded
    assert row["failed"]["stickyproxy"] == 2
    assert row["errors"] == ["stickyproxy round 3: RuntimeError: no client"]
    # A run that completed nothing gives its round no ratio (it would swamp the median).
    stalled = paired_row(8, 6.0, {"stickyproxy": [_run(150, 1.2), _run(150, 1.2)],
                                  "haproxy-close": [_run(0, 0), _run(140, 1.0)],
                                  "direct": [_run(170, 0), _run(0, 0)]})
    assert stalled["vs_haproxy"]["ratios"] == [1.071] and stalled["vs_direct"]["ratios"] == [0.882]
    # The targets read the paired ratios, and count the paired runs' failures.
    # The targets read all the runs of each contender (the main table's and the extra rounds'),
    # sessions over seconds, and count the extra rounds' failures.
    cells = [{"contender": n, "concurrency": 8, "sessions": sps * 16, "window_s": 16.0, "rounds": 2,
              "sessions_per_s": sps, "failed": 0, "cpu_ms_per_session": {"proxy": 1.0},
              "spread": 1.0, "live_peak": {}}
             for n, sps in (("stickyproxy", 140.0), ("haproxy-close", 150.0), ("direct", 170.0))]
    results = {"e2e": cells, "e2e_paired": [row]}
    verdicts = {t: (m, v) for t, m, v in report.targets(results)}
    # stickyproxy (140*16 + (150+160+155)*6) / 34 s against haproxy-close (150*16 + 610*6) / 40 s
    measured, verdict = verdicts["C=8: sessions/s >= 1.0x HAProxy best (haproxy-close)"]
    assert measured.startswith("0.977x over all runs (5 of stickyproxy, 6 of haproxy-close) "
                               "(0.933x in the main table")
    assert verdict == "missed by 2.3%"
    measured, verdict = verdicts["C=8: sessions/s >= 0.95x no proxy"]
    assert measured.startswith("0.878x over all runs (5 of stickyproxy, 6 of direct)")
    assert "one round alone read 0.882-0.939" in measured
    assert verdicts["C=8: zero failures"] == ("2 (main table and extra rounds)", "missed by 2 failed")
