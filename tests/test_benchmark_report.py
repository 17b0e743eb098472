"""The committed benchmark table is what its committed figures render to.

benchmarks/RESULTS.json is the full run's machine-readable result; RESULTS.md was rendered from it
by benchmarks/report.py. Rendering again catches a report change that breaks the table (a field
read from the wrong dict printed "None s" here once) and a table edited by hand.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

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
    assert f"{meta['e2e_rounds']} round(s) of {meta['docker_window_s']} s each" in md
