"""Quality statistics and drift: mergeable histograms whose percentiles and KS statistic are right,
the non-letter test on real markup and base64, and three incremental runs into one output where the
third's input changes nature (its texts replaced by their HTML rendering): the drift line fires on the
third run and only there, --fail-on-drift exits 3, status shows it, and the report's picture adds the
trend over runs."""

import base64
import json
import pydoc
import random
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import drift
from pipeline.cli import main
from tests.conftest import SAMPLE
from transforms import quality


def test_percentiles_from_the_histogram_are_within_its_bin_width():
    values = np.arange(1, 10_001)
    hist = quality.histogram(values)
    for q in (1, 10, 50, 90, 99, 100):
        exact = np.percentile(values, q, method="inverted_cdf")
        assert abs(quality.percentile(hist, q) / exact - 1) <= 2 ** (1 / 32) - 1 + 1e-9, q
    assert quality.percentile(quality.histogram([0, 0, 5]), 50) == 0.0
    assert round(quality.percentile(quality.histogram([1, 2, 3]), 50)) == 2  # small integers keep their own bins


def test_the_histogram_ks_statistic_is_the_exact_two_sample_ks_where_bins_hold_one_value():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 16, 300), rng.integers(3, 17, 200)  # below 16, every integer has its own bin
    assert quality.cdf_distance(quality.histogram(a), quality.histogram(b)) == pytest.approx(ks_2samp(a, b).statistic)
    merged = quality.add_histograms(quality.histogram(a[:100]), quality.histogram(a[100:]))
    assert merged == quality.histogram(a)  # units add up exactly to the run


def test_mostly_non_letters_flags_markup_and_base64_but_not_prose_code_or_other_scripts():
    texts = pq.read_table(SAMPLE).column("text").to_pylist()[:50]
    html = [pydoc.HTMLDoc().page("doc", pydoc.HTMLDoc().markup(t, pydoc.HTMLDoc().preformat)) for t in texts]
    blob = base64.b64encode(random.Random(0).randbytes(3000)).decode()
    others = ["图书馆早上九点开门，晚上八点关门。" * 20, "def mean(values):\n    return sum(values) / len(values)\n",
              "| 12.5 | 13.75 | 99.1 |\n| 1 | 2 | 3 |", blob, "Attachment follows:\n" + blob]
    assert not quality.mostly_non_letters(pa.array(texts)).any()
    assert quality.mostly_non_letters(pa.array(html)).mean() >= 0.95
    assert quality.mostly_non_letters(pa.chunked_array([pa.array(others)])).tolist() == [False, False, True, True, True]


def test_the_mean_vector_signal_allows_for_sampling_noise_and_flags_a_shift():
    rng = np.random.default_rng(1)
    centre, elsewhere = rng.normal(size=64), rng.normal(size=64)

    def sample(n, shift=0.0):
        vectors = centre + shift * elsewhere + 3 * rng.normal(size=(n, 64))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        stats = quality.unit_stats(np.full(n, 50), np.zeros(n, bool), np.ones(n), vectors)
        return {**stats, "truncated": 0, "rejected": 0}

    earlier = [sample(200), sample(200)]
    calm = drift.compare(sample(200), earlier)
    assert not calm["flagged"] and [s["name"] for s in calm["signals"]] == [
        "lengths", "mean cosine", "truncated", "rejected", "mostly non-letters"]
    moved = drift.compare(sample(200, shift=1.5), earlier)
    assert [s["name"] for s in moved["signals"] if s["flagged"]] == ["mean cosine"]
    assert drift.compare(sample(10), [])["flagged"] is False  # nothing to compare with


def _day(path, rows, texts, ids, render=lambda t: t):
    pq.write_table(pa.table({"id": [ids[i] for i in rows], "text": [render(texts[i]) for i in rows]}), path)


def _png_size(path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_three_incremental_runs_the_third_of_html_fires_the_drift_line_there_only(tmp_path, capsys):
    table = pq.read_table(SAMPLE)
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    html = lambda t: pydoc.HTMLDoc().page("doc", pydoc.HTMLDoc().markup(t, pydoc.HTMLDoc().preformat))  # noqa: E731
    days = [(range(0, 270, 3), None), (range(1, 270, 3), None), (range(2, 270, 3), html)]
    argv = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress",
            "--fail-on-drift"]
    (tmp_path / "in").mkdir()
    lines, codes = [], []
    for k, (rows, render) in enumerate(days, 1):
        _day(tmp_path / "in" / f"day{k}.parquet", rows, texts, ids, render or (lambda t: t))
        codes.append(main(argv))
        captured = capsys.readouterr()
        lines.append([line for line in captured.out.splitlines() if line.startswith("  drift ")])
        assert len(lines[-1]) == 1, captured.out
    assert codes == [0, 0, 3]
    assert lines[0][0] == "  drift      first run into this output with documents: later runs are compared with it"
    assert lines[1][0].startswith("  drift      none against 1 earlier run (90 documents): lengths KS ")
    third = lines[2][0]
    assert third.startswith("  drift      FLAGGED against 2 earlier runs (180 documents): lengths KS ")
    flagged = third.split(". Within limits:")[0]
    assert "mostly non-letters 0.0% -> " in flagged and "(beyond ±" in flagged and "mean-vector cosine" in flagged

    reports = sorted((tmp_path / "out" / "_reports").glob("*.json"))
    assert [json.loads(r.read_text())["drift"]["flagged"] for r in reports] == [False, False, True]
    third_report = json.loads(reports[-1].read_text())
    assert third_report["quality"]["docs"] == 90 and third_report["quality"]["nonletter"] >= 85
    assert len(third_report["drift"]["runs"]) == 2

    assert main(["status", "--output", str(tmp_path / "out")]) == 0
    status = capsys.readouterr().out
    assert "input      90 documents, tokens p10 " in status and "mostly non-letters 9" in status
    assert "drift      FLAGGED against 2 earlier runs" in status
    assert main(["report", "--output", str(tmp_path / "out"), "--png", str(tmp_path / "trend.png")]) == 0
    assert "drift      FLAGGED" in capsys.readouterr().out
    width, height = _png_size(tmp_path / "trend.png")
    assert width > 1500 and height > 800  # the second row: the trend over the three runs


def test_flagged_runs_are_left_out_of_the_baseline_until_the_whole_window_is_flagged():
    from pipeline.report import with_drift

    def report(run_id, length, flagged):
        stats = quality.unit_stats(np.full(100, length), np.zeros(100, bool), np.ones(100), np.eye(4)[np.zeros(100, int)])
        return {"run_id": run_id, "quality": {**stats, "truncated": 0, "rejected": 0}, "drift": {"flagged": flagged}}

    earlier = [report("r1", 50, False), report("r2", 50, False), report("r3", 400, True)]  # r3: one bad batch
    after_bad = with_drift({"quality": report("r4", 50, False)["quality"]}, earlier)["drift"]
    assert after_bad["runs"] == ["r1", "r2"] and not after_bad["flagged"]
    lasting = [report(f"h{k}", 400, True) for k in range(drift.BASELINE_RUNS)]
    settled = with_drift({"quality": report("h8", 400, False)["quality"]}, earlier + lasting)["drift"]
    assert settled["runs"] == [f"h{k}" for k in range(drift.BASELINE_RUNS)] and not settled["flagged"]


def test_a_run_whose_every_row_was_rejected_is_flagged_on_its_rejected_share():
    usual = {**quality.unit_stats(np.full(100, 50), np.zeros(100, bool), np.ones(100), np.eye(4)[np.zeros(100, int)]),
             "truncated": 0, "rejected": 1, "rejected_by_reason": {"empty_text": 1}}
    broken = {**quality.merge([]), "truncated": 0, "rejected": 100, "rejected_by_reason": {"empty_text": 100}}
    found = drift.compare(broken, [usual], ["r1"])
    assert found["flagged"] and [s["name"] for s in found["signals"]] == ["rejected"]
    assert drift.format_line(found).startswith("FLAGGED against 1 earlier run (100 documents): rejected 1.0% -> 100.0%")
    assert drift.format_quality(broken) == [("input", "no document embedded; rejected 100.0% (100 empty_text)")]


def test_the_non_letter_scan_is_right_on_sliced_arrays_and_across_its_batches():
    blob = base64.b64encode(random.Random(1).randbytes(300)).decode()
    texts = [("prose words here " * 3, blob)[i % 3 == 0] for i in range(quality.SCAN_BATCH + 300)]
    expected = [i % 3 == 0 for i in range(len(texts))]
    whole = pa.array(["x"] * 7 + texts)
    chunked = pa.chunked_array([whole.slice(7, 1000), whole.slice(1007)])  # offsets that are not 0
    assert quality.mostly_non_letters(chunked).tolist() == expected


def test_reports_whose_statistics_are_not_well_formed_are_left_out_of_the_baseline(tmp_path):
    from pipeline.output import OutputAdmin
    from pipeline.report import history, with_drift

    output = OutputAdmin(str(tmp_path))
    good = {**quality.unit_stats(np.full(50, 20), np.zeros(50, bool), np.ones(50), np.eye(4)[np.zeros(50, int)]),
            "truncated": 0, "rejected": 0}
    output.write_report("20260101T000000-a", {"run_id": "20260101T000000-a", "quality": good})
    output.write_report("20260102T000000-b", {"run_id": "20260102T000000-b", "quality": None})
    output.write_report("20260103T000000-c", {"run_id": "20260103T000000-c", "quality": {"docs": 5}})
    (tmp_path / "_reports" / "20260104T000000-d.json").write_text("{not json")
    earlier = history(output, before="20260105T000000-e")
    assert [r["run_id"] for r in earlier] == ["20260101T000000-a", "20260102T000000-b", "20260103T000000-c"]
    assert with_drift({"quality": good}, earlier)["drift"]["runs"] == ["20260101T000000-a"]
