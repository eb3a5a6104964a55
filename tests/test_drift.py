"""Quality statistics and drift: mergeable histograms whose percentiles and KS statistic are right,
the non-letter test on real markup and base64, and three incremental runs into one output where the
third's input changes nature (its texts replaced by their HTML rendering): the drift line fires on the
third run and only there, --fail-on-drift exits 3, status shows it, and the report's picture adds the
trend over runs. The share signals' exact test: right against scipy and cheap at millions of
documents; a handful of documents with one odd or blank one is not flagged, whatever the baseline;
the examples of docs/QUALITY.md and a jump of the rejected share in a large run are."""

import base64
import json
import pydoc
import random
import re
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from docembed.quality import drift
from docembed.cli import main
from tests.conftest import SAMPLE
from docembed.quality import stats as quality


@pytest.mark.unit
def test_percentiles_from_the_histogram_are_within_its_bin_width():
    values = np.arange(1, 10_001)
    hist = quality.histogram(values)
    for q in (1, 10, 50, 90, 99, 100):
        exact = np.percentile(values, q, method="inverted_cdf")
        assert abs(quality.percentile(hist, q) / exact - 1) <= 2 ** (1 / 32) - 1 + 1e-9, q
    assert quality.percentile(quality.histogram([0, 0, 5]), 50) == 0.0
    assert round(quality.percentile(quality.histogram([1, 2, 3]), 50)) == 2  # small integers keep their own bins


@pytest.mark.unit
def test_the_histogram_ks_statistic_is_the_exact_two_sample_ks_where_bins_hold_one_value():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 16, 300), rng.integers(3, 17, 200)  # below 16, every integer has its own bin
    assert quality.cdf_distance(quality.histogram(a), quality.histogram(b)) == pytest.approx(ks_2samp(a, b).statistic)
    merged = quality.add_histograms(quality.histogram(a[:100]), quality.histogram(a[100:]))
    assert merged == quality.histogram(a)  # units add up exactly to the run


@pytest.mark.unit
def test_mostly_non_letters_flags_markup_and_base64_but_not_prose_code_or_other_scripts():
    texts = pq.read_table(SAMPLE).column("text").to_pylist()[:50]
    html = [pydoc.HTMLDoc().page("doc", pydoc.HTMLDoc().markup(t, pydoc.HTMLDoc().preformat)) for t in texts]
    blob = base64.b64encode(random.Random(0).randbytes(3000)).decode()
    others = ["图书馆早上九点开门，晚上八点关门。" * 20, "def mean(values):\n    return sum(values) / len(values)\n",
              "| 12.5 | 13.75 | 99.1 |\n| 1 | 2 | 3 |", blob, "Attachment follows:\n" + blob]
    assert not quality.mostly_non_letters(pa.array(texts)).any()
    assert quality.mostly_non_letters(pa.array(html)).mean() >= 0.95
    assert quality.mostly_non_letters(pa.chunked_array([pa.array(others)])).tolist() == [False, False, True, True, True]


@pytest.mark.unit
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


@pytest.mark.e2e
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
    assert re.search(r"mostly non-letters 0\.0% -> \d+\.\d% \(p ", flagged) and "mean-vector cosine" in flagged

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


@pytest.mark.unit
def test_flagged_runs_are_left_out_of_the_baseline_until_the_whole_window_is_flagged():
    from docembed.pipeline.admin.report import with_drift

    def report(run_id, length, flagged):
        stats = quality.unit_stats(np.full(100, length), np.zeros(100, bool), np.ones(100), np.eye(4)[np.zeros(100, int)])
        return {"run_id": run_id, "quality": {**stats, "truncated": 0, "rejected": 0}, "drift": {"flagged": flagged}}

    earlier = [report("r1", 50, False), report("r2", 50, False), report("r3", 400, True)]  # r3: one bad batch
    after_bad = with_drift({"quality": report("r4", 50, False)["quality"]}, earlier)["drift"]
    assert after_bad["runs"] == ["r1", "r2"] and not after_bad["flagged"]
    lasting = [report(f"h{k}", 400, True) for k in range(drift.BASELINE_RUNS)]
    settled = with_drift({"quality": report("h8", 400, False)["quality"]}, earlier + lasting)["drift"]
    assert settled["runs"] == [f"h{k}" for k in range(drift.BASELINE_RUNS)] and not settled["flagged"]


@pytest.mark.unit
def test_a_run_whose_every_row_was_rejected_is_flagged_on_its_rejected_share():
    usual = {**quality.unit_stats(np.full(100, 50), np.zeros(100, bool), np.ones(100), np.eye(4)[np.zeros(100, int)]),
             "truncated": 0, "rejected": 1, "rejected_by_reason": {"empty_text": 1}}
    broken = {**quality.merge([]), "truncated": 0, "rejected": 100, "rejected_by_reason": {"empty_text": 100}}
    found = drift.compare(broken, [usual], ["r1"])
    assert found["flagged"] and [s["name"] for s in found["signals"]] == ["rejected"]
    assert drift.format_line(found).startswith("FLAGGED against 1 earlier run (100 documents): rejected 1.0% -> 100.0%")
    assert drift.format_quality(broken) == [("input", "no document embedded; rejected 100.0% (100 empty_text)")]


@pytest.mark.unit
def test_the_non_letter_scan_is_right_on_sliced_arrays_and_across_its_batches():
    blob = base64.b64encode(random.Random(1).randbytes(300)).decode()
    texts = [("prose words here " * 3, blob)[i % 3 == 0] for i in range(quality.SCAN_BATCH + 300)]
    expected = [i % 3 == 0 for i in range(len(texts))]
    whole = pa.array(["x"] * 7 + texts)
    chunked = pa.chunked_array([whole.slice(7, 1000), whole.slice(1007)])  # offsets that are not 0
    assert quality.mostly_non_letters(chunked).tolist() == expected


@pytest.mark.unit
def test_reports_whose_statistics_are_not_well_formed_are_left_out_of_the_baseline(tmp_path):
    from docembed.store.admin import OutputAdmin
    from docembed.pipeline.admin.report import history, with_drift

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


def _record(tokens, nonletter=0, truncated=0, rejected=0, vectors=None) -> dict:
    """A run's statistics as ``drift.run_quality`` makes them, from its documents' lengths in tokens;
    the first ``nonletter`` documents are mostly non-letters; every vector the same unless given."""
    tokens = np.asarray(tokens)
    n = len(tokens)
    vectors = np.eye(4)[np.zeros(n, int)] if vectors is None else vectors
    marker = {"quality": quality.unit_stats(tokens, np.arange(n) < nonletter, np.ones(n), vectors),
              "truncated": truncated, "rejected_by_reason": {"empty_text": rejected} if rejected else {}}
    return drift.run_quality([marker])


def _flagged(found: dict) -> list[str]:
    return [s["name"] for s in found["signals"] if s["flagged"]]


@pytest.mark.unit
def test_the_exact_share_test_is_scipys_hypergeometric_tail_and_cheap_at_millions():
    from scipy.stats import hypergeom

    rng = random.Random(0)
    for _ in range(3000):
        population = rng.randint(1, rng.choice([5, 60, 2000, 10**5]))
        marked, draws = rng.randint(0, population), rng.randint(0, population)
        x = rng.randint(-1, draws + 1)
        upper = hypergeom.sf(x - 1, population, marked, draws)
        lower = hypergeom.cdf(x, population, marked, draws)
        for tail, expected in ((True, upper), (False, lower)):
            got = drift.hypergeometric_tail(x, draws, marked, population, tail)
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-15), (x, draws, marked, population, tail)
    import time

    started = time.perf_counter()
    p = drift.share_p(250_500, 1_000_000, 250_000, 1_000_000, up=True)  # near the mode: the longest sum
    assert p == pytest.approx(hypergeom.sf(250_499, 2_000_000, 500_500, 1_000_000), rel=1e-6)
    assert time.perf_counter() - started < 0.5


@pytest.mark.unit
def test_a_handful_of_documents_with_one_odd_or_blank_one_is_not_flagged():
    # Issue 21: 5 ordinary documents, one a mostly-punctuation page header, against a base of 0.3%;
    # 9 documents and one blank text against runs without any. The 4-sigma rule flagged both (exit 3).
    rng = np.random.default_rng(0)
    history = [_record(rng.integers(20, 200, 300), nonletter=1) for _ in range(6)]
    header = drift.compare(_record(rng.integers(20, 200, 5), nonletter=1), history, list("abcdef"))
    assert not header["flagged"], drift.format_line(header)
    assert "mostly non-letters 0.3% -> 20.0% (p 1 >= 0.0001)" in drift.format_line(header)
    clean = [_record(rng.integers(20, 200, 300)) for _ in range(6)]
    blank = drift.compare(_record(rng.integers(20, 200, 9), rejected=1), clean, list("abcdef"))
    assert not blank["flagged"] and "rejected 0.0% -> 10.0% (p 1 >= 0.0001)" in drift.format_line(blank)
    # One blank text is not a drift even against millions of documents that held none ...
    millions = {**_record(np.full(10, 50)), "docs": 6_000_000}
    assert not drift.compare(_record(np.full(9, 50), rejected=1), [millions])["flagged"]
    # ... two in ten are; two in five against 0.3% of 1,800 are not (p 0.019 with one moved back).
    assert _flagged(drift.compare(_record(np.full(8, 50), rejected=2), [millions])) == ["rejected"]
    assert not drift.compare(_record(rng.integers(20, 200, 5), nonletter=2), history)["flagged"]


@pytest.mark.unit
def test_the_examples_of_quality_md_and_a_jump_of_rejections_in_a_large_run_still_flag():
    rng = np.random.default_rng(1)
    lengths = lambda median, n: np.maximum(1, rng.lognormal(np.log(median), 1.0, n)).astype(int)  # noqa: E731
    before = _record(lengths(55, 267), truncated=23)  # days 1 and 2: 8.6% truncated
    html = drift.compare(_record(lengths(220, 133), nonletter=130, truncated=61), [before], ["d1"])
    assert _flagged(html) == ["lengths", "truncated", "mostly non-letters"]  # and the cosine, with real vectors
    first_line = drift.compare(_record(lengths(13, 133)), [before], ["d1"])
    assert _flagged(first_line) == ["lengths"]  # truncated 8.6% -> 0.0% alone is not flagged at these sizes
    large = drift.compare(_record(np.full(900, 50), rejected=100), [_record(np.full(5000, 50))], ["r1"])
    assert _flagged(large) == ["rejected"]
    assert "rejected 0.0% -> 10.0% (p " in drift.format_line(large) and "< 0.0001)" in drift.format_line(large)
    # A million documents: a shift of one point is certain (p < 1e-99) but within the 5-point floor.
    big = drift.compare({**_record(np.full(10, 50)), "docs": 10**6, "truncated": 90_000},
                        [{**_record(np.full(10, 50)), "docs": 10**6, "truncated": 80_000}])
    assert not big["flagged"] and "truncated 8.0% -> 9.0% (p < 1e-99, within ±5.0 pts)" in drift.format_line(big)


@pytest.mark.unit
def test_signals_stored_by_earlier_versions_still_print():
    old = {"name": "truncated", "value": 0.37, "limit": 0.173, "flagged": True, "now": 0.459, "before": 0.086}
    assert drift.describe_signal(old) == "truncated 8.6% -> 45.9% (beyond ±17.3 pts)"
    stored = {"runs": ["r1", "r2"], "docs": 267, "flagged": True, "signals": [old]}
    assert drift.format_line(stored) == ("FLAGGED against 2 earlier runs (267 documents): "
                                         "truncated 8.6% -> 45.9% (beyond ±17.3 pts)")
