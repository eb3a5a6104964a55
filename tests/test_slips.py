"""Slips a new user hit: Beam's notice about Google's API clients printed in their own pipeline, a
misspelt flag named in the other spelling and without a suggestion, "1 units" and "1 files", the advice
to pass --skip-bad-files printed to a run that passed it, a hint that forgot bf16 on a CPU with it, a
dictionary-encoded (pandas ``category``) text column refused as not text, and an output whose every row
was rejected left without a part, so that readers saw no columns."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from docembed.cli import main
from docembed.pipeline.admin.report import build_report, coverage, format_run_report, hint
from docembed.pipeline.admin.status import format_status, run_state
from docembed.pipeline.admin.verify import Report, format_verification
from docembed.pipeline.options import suggest_flag
from docembed.pipeline.plan import BadFile, describe_outside, plan_input
from docembed.pipeline.progress import format_dry_run, format_summary
from docembed.quality import drift
from docembed.text import plural
from docembed.transforms.read import read_unit
from tests.conftest import bare_settings, read_output, sample_docs, write_docs
from tests.test_bad_input import _corrupt_pages, _run

# Each test carries its own marker: most are unit; those that run the pipeline (6 and 7) are e2e.


# 1. Beam's import-time notice ---------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("before", ["", "import logging; logging.basicConfig()"],
                         ids=["no-logging-set-up", "logging-set-up-first"])
def test_importing_docembeds_transforms_prints_no_notice_about_googles_clients(tmp_path, before):
    """Beam warns through the root logger, as it is imported, that apitools is absent: a user's own
    pipeline that imports docembed's transforms sees nothing of it, with or without logging set up,
    and the user's own warnings still print."""
    script = textwrap.dedent(f"""
        {before}
        from docembed import EmbedDocuments, EmbedParquet
        EmbedDocuments, EmbedParquet
        import logging
        logging.warning("the user's own warning")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "apitools" not in done.stderr and "bigquery" not in done.stderr, done.stderr
    assert "the user's own warning" in done.stderr


# 2. A misspelt flag --------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("typed, meant", [
    ("--chekpoint_every", "--checkpoint_every"),
    ("--chekpoint-every", "--checkpoint-every"),
    ("--direct-num-workers", "--direct_num_workers"),  # Beam's flags take underscores only
])
def test_a_misspelt_flag_is_named_as_typed_with_the_flag_meant(tmp_path, capsys, typed, meant):
    code = main(["run", "--input", "jobs/sample/docs.parquet", "--output", str(tmp_path / "o"), typed, "5"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"docembed: error: unknown flag {typed} (did you mean {meant}?)" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.unit
def test_a_flag_like_no_other_gets_no_suggestion(tmp_path, capsys):
    assert main(["run", "--input", "jobs/sample/docs.parquet", "--output", str(tmp_path / "o"), "--bogus_flag"]) == 2
    err = capsys.readouterr().err
    assert "unknown flag --bogus_flag" in err and "did you mean" not in err


@pytest.mark.unit
def test_the_suggestion_follows_the_users_spelling():
    known = ["--checkpoint-every", "--checkpoint_every", "--runner", "--input"]
    assert suggest_flag("--checkpoint-evry", known) == "--checkpoint-every"
    assert suggest_flag("--checkpoint_evry", known) == "--checkpoint_every"
    assert suggest_flag("--runer", known) == "--runner"
    assert suggest_flag("--zzz", known) is None


# 3. Plurals ----------------------------------------------------------------------------------------

@pytest.mark.unit
def test_plural():
    assert [plural(n, "unit") for n in (0, 1, 2)] == ["0 units", "1 unit", "2 units"]
    assert plural(1, "batch", "batches") == "1 batch" and plural(3, "batch", "batches") == "3 batches"


def _summary(**changes) -> dict:
    summary = {"output": "out/", "input_rows": 1, "embedded": 1, "rejected": 0, "truncated": 0, "rows": 1,
               "windows": 1, "tokens": 5, "text_tokens": 1, "dropped_tokens": 0, "rejected_by_reason": {},
               "long_docs": "chunks", "processed": 1, "skipped": 0, "skipped_files": [], "total_embedded": 1,
               "total_rejected": 0, "units_committed": 1, "units_skipped": 0, "units_total": 1, "max_seq_length": 8,
               "seconds": 1.0, "cleaned": ["out/part-x.parquet"],
               "retried": {"tried": 1, "embedded": 1, "units": 1, "reasons": ["model_error"]}}
    return {**summary, **changes}


@pytest.mark.unit
def test_the_summary_says_one_of_a_thing_in_the_singular():
    printed = format_summary(_summary())
    assert "; 1 chunk row written" in printed
    assert "windows    1 window of up to 8 tokens for 1 document (one row each); 1 text token, all embedded" in printed
    assert "accounted  1 input row = 1 embedded + 0 rejected" in printed
    assert "retried    1 rejected row (model_error) of 1 unit: 1 embedded now" in printed
    assert "cleaned    1 file without a done-marker removed" in printed
    printed = format_summary(_summary(input_rows=2, rows=2, windows=3, embedded=2, text_tokens=0, cleaned=[]))
    assert "2 chunk rows written" in printed and "3 windows of up to 8 tokens for 2 documents" in printed
    assert "0 text tokens" in printed and "2 input rows =" in printed


def _dry_run(**changes) -> dict:
    settings = SimpleNamespace(device="auto", precision="auto", output="out/", model="m",
                               model_ref=SimpleNamespace(kind="local"), model_revision="r", dim=4, max_seq_length=8,
                               normalize=True)
    d = {"settings": settings, "files": 1, "units": 1, "rows": 1, "text_bytes": 10, "units_done": 0, "rows_done": 0,
         "units_todo": 1, "rows_todo": 1, "text_bytes_todo": 10, "superseded_units": 0, "runner": "DirectRunner",
         "skipped_files": [], "repairs": []}
    return {**d, **changes}


@pytest.mark.unit
def test_the_dry_run_says_one_of_a_thing_in_the_singular():
    printed = format_dry_run(_dry_run())
    assert "input      1 file, 1 unit, 1 row, 0.0 MB of text" in printed
    assert "out/: 0 units (0 rows) already done, 1 unit (1 row, 0.0 MB of text) to do" in printed
    printed = format_dry_run(_dry_run(files=2, units=3, rows=4, units_done=1, rows_done=1, units_todo=2, rows_todo=3))
    assert "input      2 files, 3 units, 4 rows" in printed
    assert "out/: 1 unit (1 row) already done, 2 units (3 rows, " in printed


@pytest.mark.unit
def test_status_report_verify_and_drift_say_one_of_a_thing_in_the_singular():
    assert describe_outside({"source": "a.parquet", "gone": True, "units": 1, "rows": 1}) == \
        "a.parquet is gone since it was embedded: its 1 unit (1 row)"
    assert describe_outside({"source": "a.parquet", "gone": False, "units": 2, "rows": 30}).endswith(
        "its 2 units (30 rows)")
    status = {"output": "out/", "run": run_state({"status": "complete"}, None, {"u": {}}, 1), "units_done": 1,
              "units_total": 1, "units_running": 0, "docs_done": 1, "docs_total": 1, "docs_in_progress": 0,
              "embedded": 1, "rejected": 0, "text_bytes_done": 1, "text_bytes_total": 1, "damaged": [],
              "outside_inputs": [describe_outside({"source": "a.parquet", "gone": False, "units": 1, "rows": 1})]}
    assert "elsewhere  a.parquet is not in --input: its 1 unit (1 row)" in format_status(status)
    assert coverage("mean", 1, 0, 1, 1, 0, 8) == [
        ("windows", "1 window of up to 8 tokens for 1 document (averaged into one vector per document); "
                    "1 text token, all embedded")]
    assert "dropping 0 of 1 text token (0.0%)" in coverage("truncate", 1, 0, 1, 1, 0, 8)[0][1]
    assert format_verification("out/", Report(rows=1, parts=1, rejected=1)) == \
        "verify out/: 1 row in 1 part, 1 rejected row: OK"
    assert format_verification("out/", Report(rows=2, parts=2, problems=["x"])).splitlines()[0] == \
        "verify out/: 2 rows in 2 parts, 0 rejected rows: 1 problem"
    assert drift.format_line({"docs": 1, "runs": ["r1"], "signals": [
        {"name": "mean cosine", "value": 1.0, "limit": 0.9, "flagged": False}]}).startswith(
        "none against 1 earlier run (1 document): ")


@pytest.mark.unit
def test_the_run_report_says_one_of_a_thing_in_the_singular():
    r = {"docs_embedded": 1, "docs_truncated": 0, "rows": 1, "windows": 1, "tokens": 1, "text_tokens": 1,
         "dropped_tokens": 0, "window": 8, "long_docs": "truncate", "docs_per_s": 1.0, "tokens_per_s": 1.0,
         "wall_s": 1.0, "batches": 1, "batch_latency_ms": {"p50": 1, "p95": 1, "p99": 1, "p99.9": 1},
         "stage_s": dict.fromkeys(("read", "tokenize", "forward", "write", "other"), 0.2),
         "stage_share": dict.fromkeys(("read", "tokenize", "forward", "write", "other"), 0.2), "padding_share": 0.0,
         "peak_rss_mib": 1.0, "device": "cpu", "precision": "fp32", "threads": None, "workers": 1, "hint": "balanced",
         "judged_runs": ["r0"], "judged_units": 1,
         "canaries": {"checked": 19, "pinned": True, "workers": 1, "min_cosine": 1.0, "lowest": "x", "threshold": 0.999}}
    printed = format_run_report(r)
    assert "counts     1 document, 1 row written, 1 window, 1 token through the model" in printed
    assert "include 1 unit committed by run r0" in printed
    assert "(1 worker process): lowest cosine" in printed


# 4. --skip-bad-files --------------------------------------------------------------------------------

def _good_and_bad(folder):
    write_docs(folder / "a.parquet", ["a1"], ["a good file"])
    (folder / "b.parquet").write_text("id,text\n1,a CSV file named .parquet\n")


@pytest.mark.unit
def test_a_run_that_skips_bad_files_is_not_told_to_pass_skip_bad_files(tmp_path):
    _good_and_bad(tmp_path)
    plan = plan_input(str(tmp_path), {"id": "id", "text": "text"}, 10, skip_bad_files=True)
    (skipped,) = plan.skipped
    assert "is not a readable Parquet file" in skipped["error"] and "--skip-bad-files" not in skipped["error"]
    for printed in (format_summary(_summary(skipped_files=list(plan.skipped))),
                    format_dry_run(_dry_run(skipped_files=list(plan.skipped)))):
        (line,) = [line for line in printed.splitlines() if line.startswith("  skipped ")]
        assert line.startswith(f"  skipped    {tmp_path}/b.parquet (--skip-bad-files): ")
        assert "pass --skip-bad-files" not in line and "fix or remove" not in line


@pytest.mark.unit
def test_a_run_that_does_not_skip_them_is_told_how(tmp_path):
    _good_and_bad(tmp_path)
    with pytest.raises(BadFile) as refused:
        plan_input(str(tmp_path), {"id": "id", "text": "text"}, 10)
    assert str(refused.value).endswith("; fix or remove it, or pass --skip-bad-files")
    again = pickle.loads(pickle.dumps(refused.value))
    assert str(again) == str(refused.value) and again.reason == refused.value.reason


# 5. The hint names bf16 where the run's CPU has it ---------------------------------------------------

@pytest.mark.unit
def test_the_hint_offers_bf16_to_an_fp32_run_on_a_cpu_with_native_bf16():
    busy = {"forward": 0.8}
    offered = hint(busy, "cpu", "fp32", cpu_bf16=True)
    assert offered.startswith("model-bound (forward > 70%): --precision bf16 (this run's CPU has native bf16)")
    assert "--precision int8 on CPUs with VNNI" in offered
    for device, precision, bf16 in (("cpu", "fp32", False), ("cpu", "bf16", True), ("cpu", "int8", True),
                                    ("cuda", "fp16", True)):
        told = hint(busy, device, precision, cpu_bf16=bf16)
        assert told.startswith("model-bound") and "--precision bf16" not in told
    assert hint(busy) == hint(busy, "cpu", "fp32", cpu_bf16=False)
    assert "bf16" not in hint({"forward": 0.5, "tokenize": 0.35}, "cpu", "fp32", cpu_bf16=True)


@pytest.mark.unit
@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_the_report_takes_the_capability_from_the_workers_record(tmp_path, cpu_bf16):
    marker = {"run_id": "r", "unit_id": "u", "source": "a.parquet", "row_start": 0, "row_end": 1,
              "started_at": 0.0, "committed_at": 1.0, "embedded": 1, "rejected": 0, "truncated": 0, "tokens": 1,
              "padded_tokens": 1, "batch_stats": [[1, 1, 1, 0.9]], "seconds": {"forward": 0.9},
              "numerics": {"device": "cpu", "precision": "fp32", "cpu_bf16": cpu_bf16}}
    built = build_report("r", {"u": marker}, 1.0, 0.0, bare_settings(str(tmp_path)), 1, None)
    assert ("--precision bf16" in built["hint"]) == cpu_bf16


@pytest.mark.unit
def test_a_cpu_worker_records_whether_its_cpu_has_native_bf16():
    pytest.importorskip("torch")
    from docembed.model.numerics import cpu_has_native_bf16, resolve

    assert resolve("cpu", "fp32")["cpu_bf16"] == cpu_has_native_bf16()


# 6. A dictionary-encoded text column is text --------------------------------------------------------

ENCODINGS = {  # how a writer may store a column of strings (or integers, for ids), by name
    "category": lambda a: a.dictionary_encode(),
    "large-category": lambda a: (a.cast(pa.large_string()) if pa.types.is_string(a.type) else a).dictionary_encode(),
    "view": lambda a: a.cast(pa.string_view()) if pa.types.is_string(a.type) else a,
}


@pytest.mark.unit
@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("ids", [["a", "b", "c", "d"], [1, 2, 3, 4]], ids=["string-ids", "integer-ids"])
def test_a_dictionary_encoded_or_view_column_is_planned_and_read_as_plain_values(tmp_path, encoding, ids):
    texts = ["one", "two", "one", None]
    encode = ENCODINGS[encoding]
    write_docs(tmp_path / "plain.parquet", ids, texts)
    pq.write_table(pa.table({"id": encode(pa.array(ids)), "text": encode(pa.array(texts))}), tmp_path / "enc.parquet")
    settings = bare_settings(str(tmp_path / "out"))
    read = {}
    for name in ("plain", "enc"):
        (unit,) = plan_input(str(tmp_path / f"{name}.parquet"), {"id": "id", "text": "text"}, 10).units
        rows, rejected, digest = read_unit(unit, settings)
        read[name] = (rows.drop_columns("_row"), rejected.select(["id", "row_index", "reason"]), digest)
    assert read["enc"][0].schema == pa.schema([("id", pa.string()), ("text", pa.string())])
    assert read["enc"][0].equals(read["plain"][0]) and read["enc"][1].equals(read["plain"][1])
    assert read["enc"][2] == read["plain"][2]  # the digest verify --input compares the texts with


@pytest.mark.unit
def test_a_dictionary_of_numbers_is_still_no_text_column(tmp_path, capsys):
    pq.write_table(pa.table({"id": ["a"], "body": pa.array([7]).dictionary_encode()}), tmp_path / "in.parquet")
    code = main(["run", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
                 "--text-column", "body", "--no-progress"])
    assert code == 2  # Parquet keeps a dictionary of numbers as the numbers
    assert "text column 'body' has type int64; it must be string or binary" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_pandas_category_text_column_is_embedded_like_plain_strings(tmp_path):
    import pandas as pd

    ids, texts = sample_docs()
    frame = pd.DataFrame({"id": ids[:24], "text": texts[:24], "kind": ["short", "long"] * 12})
    frame.to_parquet(tmp_path / "plain.parquet", index=False)
    frame[["id", "text", "kind"]] = frame[["id", "text", "kind"]].astype("category")
    frame.to_parquet(tmp_path / "category.parquet", index=False)
    assert pa.types.is_dictionary(pq.read_schema(tmp_path / "category.parquet").field("text").type)
    outputs = {}
    for name in ("plain", "category"):
        summary = _run(tmp_path / f"{name}.parquet", tmp_path / name, "--passthrough-columns", "kind")
        assert (summary["embedded"], summary["rejected"]) == (24, 0)
        outputs[name] = read_output(tmp_path / name).sort_by("id")
    assert outputs["category"].select(["id", "embedding"]).equals(outputs["plain"].select(["id", "embedding"]))
    assert outputs["category"].column("kind").to_pylist() == outputs["plain"].column("kind").to_pylist()
    assert main(["verify", "--output", str(tmp_path / "category"), "--input", str(tmp_path / "category.parquet"),
                 "--no-canaries"]) == 0


# 7. An output whose every row was rejected still has its schema -------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("long_docs, dtype, columns, value_type", [
    ("truncate", "float32", ["id", "embedding", "n"], pa.float32()),
    ("chunks", "int8", ["chunk", "char_start", "char_end", "id", "embedding", "n"], pa.int8()),
])
def test_an_output_whose_every_row_is_rejected_is_readable_with_its_schema(tmp_path, capsys, long_docs, dtype,
                                                                           columns, value_type):
    """Every text empty or null, and a file whose texts cannot be read (--skip-bad-files): each unit
    publishes a part with no rows and the full schema; verify passes; a rerun changes nothing; and an
    int8 output's calibration is pinned later by the first unit with vectors, not by these."""
    n = pa.array([1, 2, 3], pa.int32())
    write_docs(tmp_path / "in" / "a.parquet", ["a", "b", "c"], ["", None, "   \n"], n=n)
    write_docs(tmp_path / "in" / "b.parquet", ["d", "e", "f"], ["one", "two", "three"], n=n)
    _corrupt_pages(tmp_path / "in" / "b.parquet", column=1, row_group=0)
    out = tmp_path / "out"
    argv = ["--passthrough-columns", "n", "--long-docs", long_docs, "--output-dtype", dtype, "--skip-bad-files"]
    summary = _run(tmp_path / "in", out, *argv)
    assert (summary["embedded"], summary["rejected"]) == (0, 6)
    import pandas as pd

    frame = pd.read_parquet(out)
    assert frame.shape == (0, len(columns)) and sorted(frame.columns) == sorted(columns)
    schema = ds.dataset(str(out), format="parquet").schema
    assert schema.field("embedding").type == pa.list_(value_type, 384)
    assert schema.field("id").type == pa.string() and schema.field("n").type == pa.int32()
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(parts) == 2 and all(pq.read_metadata(out / p).num_rows == 0 for p in parts)
    assert main(["verify", "--output", str(out), "--no-canaries"]) == 0, capsys.readouterr().out
    stamps = {p: (out / p).stat().st_mtime_ns for p in parts}
    again = _run(tmp_path / "in", out, *argv)
    assert again["units_committed"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == stamps
    write_docs(tmp_path / "in" / "c.parquet", ["g", "h"], ["a document", "another document"],
               n=pa.array([4, 5], pa.int32()))
    assert _run(tmp_path / "in", out, *argv)["embedded"] == 2
    assert sorted(read_output(out).column("id").to_pylist()) == ["g", "h"]
    assert main(["verify", "--output", str(out), "--no-canaries"]) == 0, capsys.readouterr().out


@pytest.mark.e2e
def test_an_input_with_no_rows_writes_no_part(tmp_path, capsys):
    """The limit: an input with no rows plans no unit, and a part is written by a unit, so the output
    holds no part and readers see no columns. The run and verify still succeed."""
    write_docs(tmp_path / "in.parquet", pa.array([], pa.string()), pa.array([], pa.string()))
    assert _run(tmp_path / "in.parquet", tmp_path / "out")["input_rows"] == 0
    assert not list((tmp_path / "out").glob("part-*"))
    assert main(["verify", "--output", str(tmp_path / "out"), "--no-canaries"]) == 0, capsys.readouterr().out
