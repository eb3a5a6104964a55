"""End to end on the DirectRunner with the real model and real Parquet: ids, counts, vectors, reruns."""

import dataclasses
import json
import shutil

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from docembed.pipeline.options import EmbedOptions, parse
from docembed.pipeline.run import run
from docembed.pipeline.settings import resolve_settings
from tests.conftest import by_id, cosine, read_output, vectors, write_docs
from docembed.store.admin import OutputAdmin
from docembed.transforms.commit import commit_unit
from docembed.errors import FingerprintMismatch
from docembed.transforms import rejects
from docembed.records import UnitEmbeddings, WorkUnit

pytestmark = pytest.mark.e2e


def _inputs(tmp_path, docs):
    ids, texts = docs
    thirds = [slice(0, 60), slice(60, 130), slice(130, None)]
    for n, part in enumerate(thirds):
        write_docs(tmp_path / "in" / f"docs-{n}.parquet", ids[part], texts[part], row_group_size=25,
                   title=[f"title {i}" for i in ids[part]])
    write_docs(tmp_path / "in" / "other.txt.parquet", ["not-matched"], ["excluded by the glob"])
    return f"{tmp_path}/in/docs-*.parquet"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, docs):
    tmp = tmp_path_factory.mktemp("e2e")
    glob = _inputs(tmp, docs)
    argv = ["--input", glob, "--output", str(tmp / "out"), "--checkpoint-every", "50",
            "--passthrough-columns", "title", "--no-progress"]
    summary = run(argv)
    return tmp, argv, summary


def test_every_document_once_with_exact_ids_across_files_and_a_glob(finished, docs):
    tmp, _, summary = finished
    ids, _ = docs
    table = read_output(tmp / "out")
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    assert table.num_rows == len(ids) == summary["embedded"] == summary["input_rows"]
    assert table.column("title").to_pylist() == [f"title {i}" for i in table.column("id").to_pylist()]


def test_schema_is_string_id_and_fixed_size_float32_embedding(finished):
    table = read_output(finished[0] / "out")
    assert str(table.schema.field("id").type) == "string"
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[384]"


def test_vectors_match_sentence_transformers_encode(finished, docs, reference_model):
    ids, texts = docs
    got = by_id(read_output(finished[0] / "out"))
    reference = reference_model.encode(texts, batch_size=128)
    cos = cosine(np.stack([got[i] for i in ids]), reference)
    assert cos.min() >= 0.9999
    assert np.allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-4)  # the model normalises


def test_pyarrow_pandas_duckdb_polars_and_datasets_read_the_same_rows(finished, docs, tmp_path, monkeypatch):
    """An output folder opened as users open it, each reader with the path README gives it: every reader
    gets every document once, with the same vector."""
    import datasets
    import polars as pl
    import pyarrow.dataset as pads

    out = finished[0] / "out"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tables = {
        "pyarrow": pads.dataset(out, format="parquet").to_table(),
        "pandas": pa.Table.from_pandas(pd.read_parquet(out), preserve_index=False),
        "duckdb": duckdb.sql(f"select * from read_parquet('{out}/*.parquet')").arrow().read_all(),
        "polars": pl.read_parquet(f"{out}/*.parquet").to_arrow(),
        "datasets": datasets.load_dataset("parquet", data_files=f"{out}/*.parquet", split="train",
                                          cache_dir=str(tmp_path / "hf")).data.table,
    }
    expected = by_id(tables["pyarrow"])
    assert sorted(expected) == sorted(docs[0])
    for reader, table in tables.items():
        ids = table.column("id").to_pylist()
        assert sorted(ids) == sorted(docs[0]) and len(ids) == len(set(ids)), reader
        # Some readers give the fixed-size list back as a plain list: compare values, not types.
        got = dict(zip(ids, table.column("embedding").to_pylist()))
        assert all(np.array_equal(np.asarray(got[i], dtype=np.float32), expected[i]) for i in ids), reader


def test_manifest_records_model_settings_inputs_counts_and_parts(finished, docs, reference_model):
    out = finished[0] / "out"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["fingerprint"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert manifest["fingerprint"]["model_revision"].startswith("sha256:")
    assert manifest["fingerprint"]["dim"] == 384 and manifest["fingerprint"]["normalize"] is True
    assert manifest["fingerprint"]["max_seq_length"] == 256
    assert "mean" in manifest["fingerprint"]["pooling"]
    assert [f["url"].rsplit("/", 1)[1] for f in manifest["inputs"]] == [f"docs-{n}.parquet" for n in range(3)]
    assert all(f["fingerprint"].startswith("mtime:") and f["size"] > 0 for f in manifest["inputs"])
    assert manifest["counts"]["embedded"] == manifest["counts"]["input_rows"] == len(docs[0])
    window = reference_model.max_seq_length
    over = sum(len(ids) > window for ids in reference_model.tokenizer(docs[1])["input_ids"])
    assert manifest["counts"]["truncated"] == over >= 1
    assert sorted(manifest["parts"]) == sorted(p.name for p in out.glob("part-*.parquet"))
    for part in manifest["parts"]:
        meta = pq.read_schema(out / part).metadata
        assert json.loads(meta[b"docembed.fingerprint"]) == manifest["fingerprint"]


def test_rerunning_a_finished_job_is_a_quick_no_op(finished):
    tmp, argv, first = finished
    before = {p.name: p.stat().st_mtime_ns for p in (tmp / "out").glob("part-*")}
    again = run(argv)
    assert again["units_committed"] == 0 and again["embedded"] == 0
    assert again["units_skipped"] == first["units_total"] and again["skipped"] == first["input_rows"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp / "out").glob("part-*")} == before


def test_resuming_with_other_vector_settings_fails_naming_the_difference(finished):
    tmp, argv, _ = finished
    with pytest.raises(FingerprintMismatch, match=r"normalize: True -> False"):
        run(argv + ["--no-normalize"])
    with pytest.raises(FingerprintMismatch, match=r"max_seq_length: 256 -> 128"):
        run(argv + ["--max-seq-length", "128"])


def test_overwrite_starts_afresh_with_new_settings(tmp_path, docs):
    ids, texts = docs
    write_docs(tmp_path / "a.parquet", ids[:40], texts[:40])
    argv = ["--input", str(tmp_path / "a.parquet"), "--output", str(tmp_path / "out"), "--no-progress"]
    run(argv)
    run(argv + ["--no-normalize", "--max-seq-length", "32", "--overwrite"])
    table = read_output(tmp_path / "out")
    assert sorted(table.column("id").to_pylist()) == sorted(ids[:40])
    norms = np.linalg.norm(vectors(table), axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)  # really unnormalised now


def test_rows_that_cannot_be_embedded_are_recorded_with_a_reason(tmp_path):
    ids = ["a", None, "c", "d", "e"]
    texts = ["a real sentence", "has no id", "   ", None, "another real sentence"]
    write_docs(tmp_path / "a.parquet", ids, texts)
    summary = run(["--input", str(tmp_path / "a.parquet"), "--output", str(tmp_path / "out"), "--no-progress"])
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == ["a", "e"]
    rejects = pq.read_table(tmp_path / "out" / "_rejects").sort_by("row_index").to_pylist()
    assert [(r["row_index"], r["id"], r["reason"]) for r in rejects] == [
        (1, None, "null_id"), (2, "c", "empty_text"), (3, "d", "empty_text")]
    assert summary["embedded"] + summary["rejected"] == summary["input_rows"] == 5


def test_status_reads_the_checkpoints_of_a_finished_run(finished, capsys):
    from docembed.cli import main

    tmp, _, summary = finished
    assert main(["status", "--output", str(tmp / "out")]) == 0
    printed = capsys.readouterr().out
    units = summary["units_total"]
    assert f"units      {units}/{units} done, 0 running" in printed
    assert f"documents  {summary['input_rows']}/{summary['input_rows']} done (100.0%)" in printed


def test_a_retried_commit_replaces_its_part_instead_of_adding_rows(finished, tmp_path):
    """Beam may run a bundle again after it committed (Dataflow retries failed bundles): the second
    commit of a unit publishes the same deterministic part name, so rows are never duplicated."""
    tmp, argv, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(tmp / "out", copy)
    output = OutputAdmin(str(copy))
    marker = sorted(output.done_markers().values(), key=lambda m: m["unit_id"])[0]
    part = pq.read_table(copy / marker["part"]).select(["id", "embedding", "title"])
    settings = resolve_settings(parse(argv).view_as(EmbedOptions))
    settings = dataclasses.replace(settings, output=str(copy))
    retry = UnitEmbeddings(WorkUnit.from_json(marker), part.select(["id", "title"]),
                           rejects.empty(), vectors(part), 0, 0, 0, 0, numerics=marker["numerics"])
    before = read_output(copy).num_rows
    commit_unit(retry, settings, output)
    assert read_output(copy).num_rows == before
    assert pq.read_table(copy / marker["part"]).select(["id", "embedding", "title"]).equals(part)


def test_a_retry_that_rejects_every_row_leaves_nothing_of_an_earlier_attempt(finished, tmp_path):
    tmp, argv, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(tmp / "out", copy)
    output = OutputAdmin(str(copy))
    marker = sorted(output.done_markers().values(), key=lambda m: m["unit_id"])[0]
    part = pq.read_table(copy / marker["part"])
    settings = resolve_settings(parse(argv).view_as(EmbedOptions))
    settings = dataclasses.replace(settings, output=str(copy))
    all_rejected = rejects.rejections(part.column("id"), pa.array(range(part.num_rows), pa.int64()),
                                      marker["source"], ["model_error"] * part.num_rows, ["failed"] * part.num_rows)
    retry = UnitEmbeddings(WorkUnit.from_json(marker), part.select(["id", "title"]).slice(0, 0), all_rejected,
                           vectors(part)[:0], 0, 0, 0, 0, numerics=marker["numerics"])
    commit_unit(retry, settings, output)
    left = pq.read_table(copy / marker["part"])  # the earlier attempt's rows are gone; the schema stays
    assert left.num_rows == 0 and left.schema.field("embedding").type == part.schema.field("embedding").type
    assert pq.read_table(copy / "_rejects" / f"{marker['unit_id']}.parquet").num_rows == part.num_rows
