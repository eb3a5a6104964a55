"""Bad input, every case through the real pipeline: each row ends embedded or rejected with a reason,
and bad files or jobs fail with a clear message before work, or are recorded when skipped."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from docembed.cli import main
from docembed.pipeline.run import run
from tests.conftest import by_id, cosine, read_output, write_docs

FLAGS = ["--no-progress"]


def _run(inp, out, *extra):
    return run(["--input", str(inp), "--output", str(out), *FLAGS, *extra])


def _rejects(out):
    table = pq.read_table(out / "_rejects")
    return sorted((r["source"].rsplit("/", 1)[1], r["row_index"], r["id"], r["reason"]) for r in table.to_pylist())


def _cli_error(capsys, *argv):
    code = main(["run", *argv, *FLAGS])
    return code, capsys.readouterr().err


@pytest.mark.e2e
def test_binary_text_is_decoded_and_invalid_utf8_is_rejected(tmp_path, reference_model):
    texts = ["plain ascii text".encode(), "caf\u00e9 na\u00efve r\u00e9sum\u00e9".encode(), b"\xff\xfe broken", None]
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "text": pa.array(texts, pa.binary())}), tmp_path / "in.parquet")
    summary = _run(tmp_path / "in.parquet", tmp_path / "out")
    got = by_id(read_output(tmp_path / "out"))
    assert sorted(got) == ["a", "b"]
    reference = reference_model.encode(["plain ascii text", "caf\u00e9 na\u00efve r\u00e9sum\u00e9"])
    assert cosine(np.stack([got["a"], got["b"]]), reference).min() >= 0.9999
    assert _rejects(tmp_path / "out") == [("in.parquet", 2, "c", "invalid_utf8"), ("in.parquet", 3, "d", "empty_text")]
    assert summary["rejected_by_reason"] == {"empty_text": 1, "invalid_utf8": 1}


@pytest.mark.parametrize("values,type_name", [([1, 2], "int64"), ([["a"], ["b"]], "list<element: string>")])
@pytest.mark.unit
def test_a_numeric_or_nested_text_column_is_a_planning_error_naming_it(tmp_path, capsys, values, type_name):
    pq.write_table(pa.table({"id": ["a", "b"], "body": values}), tmp_path / "in.parquet")
    code, err = _cli_error(capsys, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
                           "--text-column", "body")
    assert code == 2
    assert f"text column 'body' has type {type_name}; it must be string or binary" in err
    assert not (tmp_path / "out").exists()  # nothing was done


@pytest.mark.e2e
def test_a_5mb_document_is_truncated_counted_and_embedded_like_its_first_window(tmp_path, reference_model):
    huge = "Beam pipelines embed documents in batches of similar length. " * 85_000  # ~5.2 MB
    write_docs(tmp_path / "in.parquet", ["huge", "small"], [huge, "a small document"])
    summary = _run(tmp_path / "in.parquet", tmp_path / "out")
    assert (summary["embedded"], summary["truncated"]) == (2, 1)
    got = by_id(read_output(tmp_path / "out"))
    reference = reference_model.encode([huge[:20_000]])[0]  # the model sees only the first 256 tokens
    assert cosine(got["huge"], reference) >= 0.9999


@pytest.mark.e2e
def test_control_characters_and_odd_unicode_are_embedded_normally(tmp_path, reference_model):
    texts = ["tab\there\x00nul\x07bell\x1b[31m ansi", "zero\u200bwidth \ufeffbom \u202eright-to-left",
             "emoji \U0001F389\U0001F680 and combining e\u0301\u0301", "\u4e2d\u6587 \u0627\u0644\u0639\u0631\u0628\u064a\u0629"]
    write_docs(tmp_path / "in.parquet", ["a", "b", "c", "d"], texts)
    summary = _run(tmp_path / "in.parquet", tmp_path / "out")
    assert summary["embedded"] == 4 and summary["rejected"] == 0
    got = by_id(read_output(tmp_path / "out"))
    assert cosine(np.stack([got[i] for i in "abcd"]), reference_model.encode(texts)).min() >= 0.9999


@pytest.mark.unit
def test_duplicate_ids_fail_the_job_before_any_embedding_with_examples_by_default(tmp_path, capsys):
    """The check runs in the job (the launcher never reads ids), as its first stage: nothing is
    embedded or committed when it fails."""
    write_docs(tmp_path / "in" / "a.parquet", ["x", "y", "x"], ["one", "two", "three"])
    write_docs(tmp_path / "in" / "b.parquet", ["y", "z"], ["four", "five"])
    code, err = _cli_error(capsys, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert code == 1 and "the job failed" in err
    assert "2 rows repeat an id" in err
    assert f"id 'x' at {tmp_path}/in/a.parquet row 2 repeats {tmp_path}/in/a.parquet row 0" in err
    assert f"id 'y' at {tmp_path}/in/b.parquet row 0 repeats {tmp_path}/in/a.parquet row 1" in err
    assert "--on-duplicate-id keep-first" in err
    assert not (tmp_path / "out" / "_checkpoints").exists()


@pytest.mark.e2e
def test_keep_first_embeds_the_first_occurrence_and_rejects_the_others(tmp_path):
    write_docs(tmp_path / "in" / "a.parquet", ["x", "y", "x"], ["one", "two", "three"])
    write_docs(tmp_path / "in" / "b.parquet", ["y", "z"], ["four", "five"])
    summary = _run(tmp_path / "in", tmp_path / "out", "--on-duplicate-id", "keep-first", "--passthrough-columns", "text")
    table = read_output(tmp_path / "out")
    assert sorted(zip(table.column("id").to_pylist(), table.column("text").to_pylist())) == [
        ("x", "one"), ("y", "two"), ("z", "five")]
    assert _rejects(tmp_path / "out") == [("a.parquet", 2, "x", "duplicate_id"), ("b.parquet", 0, "y", "duplicate_id")]
    assert summary["embedded"] + summary["rejected"] == summary["input_rows"] == 5


@pytest.mark.e2e
def test_duplicates_against_an_earlier_run_into_the_same_output(tmp_path, capsys):
    write_docs(tmp_path / "in" / "day1.parquet", ["a", "b"], ["first day", "first day again"])
    _run(tmp_path / "in", tmp_path / "out")
    write_docs(tmp_path / "in" / "day2.parquet", ["b", "c"], ["b comes back", "new"])
    code, err = _cli_error(capsys, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert code == 1 and f"id 'b' at {tmp_path}/in/day2.parquet row 0 is already in the output" in err
    summary = _run(tmp_path / "in", tmp_path / "out", "--on-duplicate-id", "keep-first")
    assert (summary["embedded"], summary["rejected"], summary["skipped"]) == (1, 1, 2)
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == ["a", "b", "c"]
    assert ("day2.parquet", 0, "b", "duplicate_id") in _rejects(tmp_path / "out")


@pytest.mark.unit
def test_an_input_matching_no_files_is_an_error_before_any_work(tmp_path, capsys):
    code, err = _cli_error(capsys, "--input", f"{tmp_path}/nothing/*.parquet", "--output", str(tmp_path / "out"))
    assert code == 2 and "matched no files" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
def test_a_missing_column_lists_the_columns_found(tmp_path, capsys):
    pq.write_table(pa.table({"doc_id": ["a"], "body": ["x"]}), tmp_path / "in.parquet")
    code, err = _cli_error(capsys, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"))
    assert code == 2
    assert "no id column 'id', text column 'text'; columns found: doc_id, body" in err


def _good_and_bad(tmp_path):
    write_docs(tmp_path / "in" / "a.parquet", ["a1", "a2"], ["good file one", "good file two"])
    write_docs(tmp_path / "in" / "c.parquet", ["c1"], ["good file three"])
    (tmp_path / "in" / "b-text.parquet").write_text("id,text\n1,this is a CSV file\n")
    whole = (tmp_path / "in" / "a.parquet").read_bytes()
    (tmp_path / "in" / "b-truncated.parquet").write_bytes(whole[: len(whole) - 40])


@pytest.mark.unit
def test_a_bad_file_among_good_ones_is_an_error_naming_it_before_embedding(tmp_path, capsys):
    _good_and_bad(tmp_path)
    code, err = _cli_error(capsys, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert code == 2 and "b-t" in err and "is not a readable Parquet file" in err and "--skip-bad-files" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_skip_bad_files_records_them_and_embeds_the_rest(tmp_path):
    _good_and_bad(tmp_path)
    summary = _run(tmp_path / "in", tmp_path / "out", "--skip-bad-files")
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == ["a1", "a2", "c1"]
    skipped = sorted(s["url"].rsplit("/", 1)[1] for s in summary["skipped_files"])
    assert skipped == ["b-text.parquet", "b-truncated.parquet"]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert sorted(s["url"].rsplit("/", 1)[1] for s in manifest["skipped_files"]) == skipped
    assert manifest["counts"]["input_rows"] == manifest["counts"]["embedded"] == 3


def _corrupt_pages(path, column, row_group):
    """Garble one column chunk's data page header, leaving the footer (and other columns) readable."""
    offset = pq.ParquetFile(path).metadata.row_group(row_group).column(column).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 16] = b"\xab" * 16
    path.write_bytes(bytes(data))


def _thirty_docs(tmp_path):
    ids = [f"d{i:02d}" for i in range(30)]
    write_docs(tmp_path / "in" / "a.parquet", ids, [f"document number {i}" for i in range(30)], row_group_size=10)
    write_docs(tmp_path / "in" / "z.parquet", ["z"], ["fine"])
    return tmp_path / "in" / "a.parquet"


@pytest.mark.unit
def test_unreadable_ids_fail_the_job_before_any_embedding_naming_the_file_and_row_group(tmp_path, capsys):
    _corrupt_pages(_thirty_docs(tmp_path), column=0, row_group=1)
    code, err = _cli_error(capsys, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert code == 1 and "a.parquet: row group 1 cannot be read" in err and "--skip-bad-files" in err
    assert not (tmp_path / "out" / "_checkpoints").exists()


@pytest.mark.e2e
def test_unreadable_text_fails_the_job_naming_the_file_or_is_rejected_when_skipping(tmp_path, capsys):
    _corrupt_pages(_thirty_docs(tmp_path), column=1, row_group=1)
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--checkpoint-every", "10"]
    code, err = _cli_error(capsys, *argv)
    assert code == 1 and "the job failed" in err and "a.parquet: rows 10-20 cannot be read" in err
    summary = run([*argv, *FLAGS, "--skip-bad-files"])
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == \
        [f"d{i:02d}" for i in range(30) if not 10 <= i < 20] + ["z"]
    assert _rejects(tmp_path / "out") == [("a.parquet", i, None, "unreadable_file") for i in range(10, 20)]
    assert summary["embedded"] + summary["rejected"] + summary["skipped"] == 31


@pytest.mark.e2e
def test_an_empty_file_counts_as_zero(tmp_path):
    write_docs(tmp_path / "in" / "a.parquet", ["a"], ["one document"])
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                   tmp_path / "in" / "empty.parquet")
    summary = _run(tmp_path / "in", tmp_path / "out")
    assert (summary["input_rows"], summary["embedded"]) == (1, 1)


@pytest.mark.e2e
def test_schemas_may_differ_when_compatible(tmp_path):
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int32()), "text": ["one", "two"],
                             "n": pa.array([1, 2], pa.int32())}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["x"], "text": pa.array(["three"], pa.large_string()),
                             "n": pa.array([3], pa.int64()), "extra": [True]}), tmp_path / "b.parquet")
    _run(f"{tmp_path}/*.parquet", tmp_path / "out", "--passthrough-columns", "n")
    table = read_output(tmp_path / "out")
    assert sorted(zip(table.column("id").to_pylist(), table.column("n").to_pylist())) == [("1", 1), ("2", 2), ("x", 3)]
    assert table.schema.field("n").type == pa.int64()


@pytest.mark.unit
def test_incompatible_schemas_are_an_error_naming_the_file(tmp_path, capsys):
    pq.write_table(pa.table({"id": ["a"], "text": ["one"], "n": [1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["b"], "text": ["two"], "n": [[1, 2]]}), tmp_path / "b.parquet")
    code, err = _cli_error(capsys, "--input", f"{tmp_path}/*.parquet", "--output", str(tmp_path / "out"),
                           "--passthrough-columns", "n")
    assert code == 2 and f"{tmp_path}/b.parquet: pass-through columns" in err


@pytest.mark.unit
def test_an_output_that_is_not_writable_is_an_error_before_any_work(tmp_path, capsys):
    write_docs(tmp_path / "in.parquet", ["a"], ["one"])
    (tmp_path / "blocker").write_text("a file where the output folder's parent should be")
    code, err = _cli_error(capsys, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "blocker" / "out"))
    assert code == 2 and "cannot write to --output" in err


@pytest.mark.parametrize("mode", ["truncate", "mean", "chunks"])
@pytest.mark.e2e
def test_a_batch_the_model_fails_on_is_split_and_only_the_failing_documents_are_rejected(tmp_path, tiny_window_model,
                                                                                        mode, monkeypatch):
    # The model fails on any input of more than 100 padded tokens, as a device short of memory fails on
    # large inputs only: a batch of 16 short documents passes, a long document fails even alone.
    monkeypatch.setenv("DOCEMBED_FAULT", "forward@*:raise>100")
    short = [f"doc {i}" for i in range(40)]                              # 4 tokens each, specials included
    long = [f"a much longer document number {i} " * 20 for i in range(3)]  # a window of over 100 tokens
    ids = [f"s{i}" for i in range(40)] + ["l0", "l1", "l2"]
    write_docs(tmp_path / "in.parquet", ids, short + long)
    summary = _run(tmp_path / "in.parquet", tmp_path / "out", "--model", tiny_window_model,
                   "--min-batch-size", "8", "--max-batch-size", "16", "--long-docs", mode, "--max-model-errors", "0.1")
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == sorted(ids[:40])  # one window each
    rejected = pq.read_table(tmp_path / "out" / "_rejects").to_pylist()
    assert sorted(r["id"] for r in rejected) == ["l0", "l1", "l2"]
    assert all(r["reason"] == "model_error" and "RuntimeError" in r["message"] for r in rejected)
    assert summary["embedded"] + summary["rejected"] == summary["input_rows"]
