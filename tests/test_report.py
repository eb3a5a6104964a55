"""The run report: written after each run, consistent with the counts, exact percentiles, a valid PNG,
Beam metrics in the docembed namespace, and a text-based ETA."""

import json

import pytest

from docembed.cli import main
from docembed.pipeline.admin.report import hint, percentiles
from docembed.pipeline.run import run
from docembed.pipeline.admin.status import eta
from tests.conftest import write_docs


@pytest.fixture(scope="module")
def reported(tmp_path_factory, docs):
    tmp = tmp_path_factory.mktemp("report")
    ids, texts = docs
    write_docs(tmp / "in.parquet", ids[:118] + ["empty-1", "empty-2"], texts[:118] + ["", "  "], row_group_size=40)
    summary = run(["--input", str(tmp / "in.parquet"), "--output", str(tmp / "out"), "--checkpoint-every", "40",
                   "--no-progress", "--cost-per-hour", "0.50"])
    return tmp, summary


@pytest.mark.e2e
def test_the_report_exists_and_its_numbers_are_consistent(reported):
    tmp, summary = reported
    files = list((tmp / "out" / "_reports").glob("*.json"))
    assert [f.stem for f in files] == [summary["run_id"]]
    r = json.loads(files[0].read_text())
    assert r["docs_embedded"] == 120 - r["docs_rejected"] == 118
    assert r["units"] == 3 and r["batches"] == len(r["batch_latencies_s"]) > 0
    assert set(r["batch_latency_ms"]) == {"p50", "p95", "p99", "p99.9"}
    measured = sum(r["stage_s"][k] for k in ("read", "tokenize", "forward", "write"))
    assert abs(measured - r["processing_s"]) <= 0.10 * r["processing_s"]  # single worker: stages cover the work
    assert abs(sum(r["stage_s"].values()) - r["wall_s"]) <= 0.01 * r["wall_s"]
    # The host path, apart from the forward pass: what the CPU stages could feed a faster model.
    assert r["host_s"] == pytest.approx(r["stage_s"]["read"] + r["stage_s"]["tokenize"] + r["stage_s"]["write"])
    assert r["host_tokens_per_s"] == pytest.approx(r["tokens"] / r["host_s"])
    assert r["cost_per_1000_docs"] == pytest.approx(0.50 * r["wall_s"] / 3600 / 118 * 1000)
    assert r["peak_rss_mib"] > 100 and r["device"] == "cpu" and r["precision"] == "fp32"
    assert r["docs_per_s"] == pytest.approx(118 / r["wall_s"])
    assert r["padding_share"] >= 0 and r["hint"]


@pytest.mark.unit
def test_percentiles_are_right_on_known_timings():
    timings = [i / 1000 for i in range(1, 1001)]  # 1 ms .. 1000 ms
    got = percentiles(timings)
    assert got["p50"] == pytest.approx(0.5005)
    assert got["p95"] == pytest.approx(0.95005)
    assert got["p99"] == pytest.approx(0.99001)
    assert got["p99.9"] == pytest.approx(0.999001)
    assert percentiles([0.2])["p99.9"] == 0.2


@pytest.mark.unit
def test_the_hint_follows_the_seed_priorities():
    assert hint({"forward": 0.8}).startswith("model-bound")
    assert hint({"forward": 0.5, "tokenize": 0.35}).startswith("preprocessing-bound")
    assert hint({"forward": 0.5, "read": 0.2, "write": 0.15}).startswith("I/O-bound")
    assert hint({"forward": 0.5, "other": 0.45}).startswith("start-up-bound")


@pytest.mark.e2e
def test_report_command_prints_and_draws_a_png(reported, tmp_path, capsys):
    out, _ = reported
    png = tmp_path / "run.png"
    assert main(["report", "--output", str(out / "out"), "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "model latency p50" in printed and "cost       " in printed and "hint" in printed
    assert "host path  read + tokenize + write" in printed and "tokens/s is what the host stages could feed" in printed
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


@pytest.mark.e2e
def test_beam_metrics_are_visible_through_the_pipeline_result(reported):
    _, summary = reported
    m = summary["metrics"]
    assert m["docs_embedded"] == 118 and m["docs_rejected"] == 2 and m["units_committed"] == 3
    assert m["docs_read"] == 120 and m["batches"] == summary["report"]["batches"]
    assert m["tokens_embedded"] == summary["report"]["tokens"]


@pytest.mark.unit
def test_the_eta_follows_text_remaining_at_the_recent_rate():
    markers = {f"u{i}": {"committed_at": 100.0 + 10 * i, "started_at": 90.0 + 10 * i, "text_bytes": 1000}
               for i in range(3)}  # 3000 bytes in the 30 s from 90 to 120
    running = {"u3": {"docs": 50, "total": 100, "text_bytes": 2000}}
    got = eta(markers, running, total_bytes=10_000, active=True)
    assert got["text_bytes_done"] == 4000
    assert got["eta_s"] == pytest.approx(6000 / 100)  # 6,000 bytes left at 100 bytes/s
    assert eta(markers, running, 10_000, active=False)["eta_s"] is None
