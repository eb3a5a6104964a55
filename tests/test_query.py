"""Queries embedded with an output's exact settings (``docembed query``, ``docembed.embed_queries``):
what they give for a document's own text must be what ``docembed run`` stored for it, in every dtype."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import docembed
from docembed.pipeline.run import run
from docembed.use.query import query_numerics, query_prompt
from tests.conftest import cosine, read_output, vectors, write_docs

DOCS = 200


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, docs):
    """200 documents (a few longer than the window) written by `docembed run` as float32, int8 and
    binary, in two units each; and a float32 output whose documents got a prefix."""
    tmp = tmp_path_factory.mktemp("query")
    ids, texts = docs[0][-DOCS:], docs[1][-DOCS:]
    write_docs(tmp / "in.parquet", ids, texts, row_group_size=100)
    found = {}
    for name, flags in (("float32", []), ("int8", ["--output-dtype", "int8"]), ("binary", ["--output-dtype", "binary"]),
                        ("prefixed", ["--prefix", "passage: "])):
        found[name] = tmp / name
        run(["--input", str(tmp / "in.parquet"), "--output", str(found[name]), "--checkpoint-every", "100",
             "--no-progress", *flags])
    return ids, texts, found


def _stored(out, ids) -> np.ndarray:
    table = read_output(out)
    rows = dict(zip(table.column("id").to_pylist(), vectors(table)))
    return np.stack([rows[i] for i in ids])


@pytest.mark.e2e
def test_a_documents_text_as_query_gives_the_stored_float_vector(outputs):
    ids, texts, found = outputs
    assert sum(len(t) > 4000 for t in texts) >= 1  # some are cut to the window, as the run cut them
    got = docembed.embed_queries(str(found["float32"]), texts, as_documents=True)
    stored = _stored(found["float32"], ids)
    assert got.dtype == np.float32 and got.shape == (DOCS, 384)
    assert cosine(got, stored).min() >= 0.99999


@pytest.mark.e2e
def test_int8_queries_use_the_outputs_pinned_calibration(outputs):
    ids, texts, found = outputs
    got = docembed.embed_queries(str(found["int8"]), texts, as_documents=True)
    stored = _stored(found["int8"], ids)
    assert got.dtype == np.int8 and got.shape == stored.shape
    # Batches of other shapes move the floats in their last bits: a value on a bucket's edge may land
    # on its other side, never further.
    assert np.abs(got.astype(int) - stored.astype(int)).max() <= 1
    assert np.mean(got == stored) >= 0.999


@pytest.mark.e2e
def test_binary_queries_match_the_stored_bits(outputs):
    ids, texts, found = outputs
    got = docembed.embed_queries(str(found["binary"]), texts, as_documents=True)
    stored = _stored(found["binary"], ids)
    assert got.dtype == np.int8 and got.shape == (DOCS, 48)
    bits = lambda v: np.unpackbits((v.astype(np.int16) + 128).astype(np.uint8), axis=1)  # noqa: E731
    assert np.mean(bits(got) == bits(stored)) >= 0.999


@pytest.mark.e2e
def test_a_model_without_a_query_prompt_gives_queries_the_documents_prefix(outputs):
    ids, texts, found = outputs
    got = docembed.embed_queries(str(found["prefixed"]), texts[:20])  # the default model has no named prompts
    assert cosine(got, _stored(found["prefixed"], ids[:20])).min() >= 0.99999
    plain = docembed.embed_queries(str(found["float32"]), texts[:20])
    assert cosine(got, plain).max() < 0.9999  # the prefix was applied: the vectors moved
    given = docembed.embed_queries(str(found["prefixed"]), texts[:20], prefix="")  # a prefix given outright
    assert cosine(given, _stored(found["float32"], ids[:20])).min() >= 0.99999


@pytest.mark.e2e
def test_the_command_prints_json_lines_and_writes_parquet(outputs, tmp_path):
    ids, texts, found = outputs
    ids, texts = zip(*[(i, t) for i, t in zip(ids, texts) if "\n" not in t][:3])  # a file holds one per line
    (tmp_path / "queries.txt").write_text(f"{texts[0]}\n\n{texts[1]}\n")
    cmd = [sys.executable, "-m", "docembed", "query", "--output", str(found["int8"]), "--as-documents"]
    done = subprocess.run([*cmd, "--file", str(tmp_path / "queries.txt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["text"] for line in lines] == list(texts[:2])
    stored = _stored(found["int8"], list(ids[:2]))
    assert np.abs(np.asarray([line["embedding"] for line in lines]) - stored).max() <= 1
    assert "2 queries embedded with sentence-transformers/all-MiniLM-L6-v2 (sha256:" in done.stderr
    assert "stored as int8 x 384" in done.stderr
    written = subprocess.run([*cmd, texts[2], "--to", str(tmp_path / "q.parquet")], capture_output=True, text=True)
    assert written.returncode == 0, written.stderr
    table = pq.read_table(tmp_path / "q.parquet")
    assert table.schema.field("embedding").type == read_output(found["int8"]).schema.field("embedding").type
    assert np.abs(vectors(table).astype(int) - _stored(found["int8"], list(ids[2:3])).astype(int)).max() <= 1


@pytest.mark.e2e
def test_bad_queries_and_outputs_are_refused_in_one_line(outputs, tmp_path):
    _, _, found = outputs
    for argv, expected in (
        (["--output", str(found["float32"]), "  "], "query 1 of 1 is empty"),
        (["--output", str(found["float32"])], "give query texts"),
        (["--output", str(tmp_path), "hello"], "holds no docembed output"),
    ):
        done = subprocess.run([sys.executable, "-m", "docembed", "query", *argv], capture_output=True, text=True)
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.unit
@pytest.mark.parametrize("documents, prompts, as_documents, expected", [
    ("passage: ", {"query": "query: ", "passage": "passage: "}, False, ("query: ", "query")),  # E5
    ("", {"query": "Represent this sentence for searching relevant passages: "}, False,
     ("Represent this sentence for searching relevant passages: ", "query")),  # BGE: documents get none
    ("passage: ", {"query": "query: ", "passage": "passage: "}, True, ("passage: ", "documents' prefix")),
    ("", {}, False, ("", "documents' prefix")),  # symmetric models: both sides alike
    ("search_document: ", {"search_document": "search_document: "}, False, ("search_document: ", "documents' prefix")),
])
def test_the_query_prompt(documents, prompts, as_documents, expected):
    assert query_prompt(documents, prompts, as_documents) == expected


@pytest.mark.unit
def test_auto_numerics_take_the_outputs_where_this_machine_runs_them_else_the_cpu_at_fp32():
    made_on_gpu = {"device": "cuda", "precision": "fp16"}
    here = query_numerics(made_on_gpu, "auto", "auto")
    import torch

    expected = ("cuda", "fp16") if torch.cuda.is_available() else ("cpu", "fp32")
    assert (here["device"], here["precision"]) == expected
    assert (query_numerics({"device": "cpu", "precision": "fp32"}, "auto", "auto")["precision"]) == "fp32"


@pytest.mark.unit
def test_queries_and_search_import_no_beam():
    from tests.conftest import REPO

    code = "import sys, docembed.use.query, docembed.use.search; print('apache_beam' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
