"""The launcher's cost does not grow with the corpus's rows: it reads footers, not rows, and the job
graph names plan shards, not units (``bench/launcher.py`` measures both, in a fresh process)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def _launcher(*args: str) -> dict:
    done = subprocess.run([sys.executable, "bench/launcher.py", "--json", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_planning_a_hundred_times_more_rows_takes_no_more_memory_and_no_bigger_graph():
    """2,000,000 rows in 2,000 row groups against 20,000 rows in the same 100 files: the launcher's
    peak memory and its graph stay the same (the id check reading every id on the launcher added
    about 170 bytes per row)."""
    small = _launcher("--rows", "20000", "--files", "100", "--row-group", "10", "--checkpoint-every", "100")
    large = _launcher("--rows", "2000000", "--files", "100", "--row-group", "1000", "--checkpoint-every", "10000")
    assert (small["rows"], large["rows"]) == (20_000, 2_000_000) and small["units"] == large["units"] == 200
    assert large["peak_rss_mib"] - small["peak_rss_mib"] < 64
    assert abs(large["graph_bytes"] - small["graph_bytes"]) < 1024


def test_the_graph_of_100000_units_stays_far_below_dataflows_20_mb_request_limit():
    result = _launcher("--units", "100000")
    assert result["shards"] == 20
    assert result["graph_bytes"] < 200_000  # about 65 KB: the DoFns and settings, not the units
    assert result["units_in_graph_bytes"] > 10 * result["graph_bytes"]  # what beam.Create(units) would ship
