"""docembed search: exact nearest neighbours over an output's committed parts, streamed, for every
stored dtype; checked against a brute-force search of all rows read at once."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from docembed import vectors
from docembed.errors import DamagedRecord, OutputError, UsageError
from docembed.store.admin import OutputAdmin
from docembed.store.layout import parts_of
from docembed.use import search as searching
from docembed.use.recipe import read_recipe
from docembed.use.search import Hit, search
from tests.conftest import REPO, read_output, write_docs

DIM = 20  # not a multiple of 8: the binary forms' last byte carries padding bits


# --- synthetic outputs, in the real format (UnitStore's part and marker, OutputAdmin's manifest) ---------------


def make_output(folder, rows: np.ndarray, dtype: str, units=(("u2", 0), ("u0", 0), ("u1", 1)), chunks=False):
    """An output of ``rows`` (float32) stored in ``dtype``, cut into the ``units`` (unit id, retry parts):
    a unit with a retry part holds its last rows there, as ``--retry-rejects`` leaves it. Units are named
    out of order on purpose: the search orders parts by name. Returns the rows in the output's order."""
    url, store = str(folder), OutputAdmin(str(folder))
    ranges = store.quantization_ranges(dtype, rows) if dtype in vectors.CALIBRATED else None
    cuts = np.array_split(np.arange(len(rows)), len(units))
    for (unit, retries), cut in zip(units, cuts):
        pieces = np.array_split(cut, retries + 1)
        marker = {"unit_id": unit, "part": None, "retry_parts": []}
        for retry, piece in enumerate(pieces):
            name = store.write_part(unit, _part_bytes(rows, piece, dtype, ranges, chunks), retry)
            if retry:
                marker["retry_parts"].append({"name": name, "bytes": None})
            else:
                marker["part"] = name
        store.mark_done(unit, marker)
    fingerprint = {"dim": DIM, "model": "test/model", "model_revision": "sha256:0", "normalize": True,
                   "output_dtype": dtype, "long_docs": "chunks" if chunks else "truncate"}
    store.write_manifest({"fingerprint": fingerprint, "status": "complete",
                          "settings": {"id_column": "id", "passthrough_columns": ["source", "year"]}})
    return url


def _part_bytes(rows, index, dtype, ranges, chunks) -> bytes:
    columns = {"id": [f"doc-{i // 3 if chunks else i}" for i in index]}
    if chunks:
        columns.update(chunk=[int(i % 3) for i in index], char_start=[int(i % 3) * 100 for i in index],
                       char_end=[int(i % 3) * 100 + 120 for i in index])
    columns["embedding"] = vectors.column(rows[index], dtype, DIM, ranges)
    if chunks:
        columns["chunk_text"] = [f"window {i}" for i in index]
    columns.update(source=[f"file-{i % 4}.txt" for i in index], year=[2000 + int(i) for i in index])
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink, row_group_size=7)  # several row groups per part
    return sink.getvalue()


def random_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


# --- the reference: every committed row read at once, scored the plain way ---------------------------------


def all_rows(url: str) -> tuple[list[str], np.ndarray]:
    """(ids, stored values) of every committed row, parts in name order."""
    output = OutputAdmin(url)
    names = sorted(n for m in output.done_markers().values() for n in parts_of(m))
    table = pa.concat_tables([output.read_part(n).select(["id", "embedding"]) for n in names])
    width = table.schema.field("embedding").type.list_size
    return table.column("id").to_pylist(), table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, width)


def brute_force(url: str, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    recipe = read_recipe(url)
    ids, stored = all_rows(url)
    dtype = recipe.output_dtype
    if dtype.endswith("binary"):
        def bits(v):
            return np.unpackbits(v.view(np.uint8), axis=-1).astype(np.int32)

        distances = np.abs(bits(queries)[:, None, :] - bits(stored)[None, :, :]).sum(-1)
        ranking = -distances
        shown = distances
    else:
        def decode(v):
            return vectors.dequantize(v, dtype, recipe.ranges) if dtype in vectors.CALIBRATED else v

        q, s = decode(queries).astype(np.float64), decode(stored).astype(np.float64)
        ranking = shown = (q @ s.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(s, axis=1)[None, :]
    found = []
    for scores, values in zip(ranking, shown):
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]  # ties: the earlier row
        found.append([(ids[i], float(values[i])) for i in order])
    return found


def assert_same(hits: list[list[Hit]], expected: list[list[tuple[str, float]]]):
    assert [[h.id for h in q] for q in hits] == [[i for i, _ in q] for q in expected]
    for q, e in zip(hits, expected):
        np.testing.assert_allclose([h.score for h in q], [s for _, s in e], rtol=0, atol=1e-5)


def queries_for(url: str, dtype: str, seed: int = 1) -> np.ndarray:
    """Five queries in the stored dtype: two stored rows as they are, three fresh vectors quantized alike."""
    recipe = read_recipe(url)
    _, stored = all_rows(url)
    fresh = vectors.quantize(random_rows(3, seed), dtype, recipe.ranges)
    return np.concatenate([stored[[5, 40]], fresh.astype(stored.dtype)])


# --- unit tests -------------------------------------------------------------------------------------------------

ALL_DTYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")


@pytest.mark.unit
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_top_k_is_the_brute_force_top_k_whatever_the_batch_size(tmp_path, dtype):
    url = make_output(tmp_path / "out", random_rows(90), dtype)
    queries = queries_for(url, dtype)
    expected = brute_force(url, queries, 7)
    for batch_rows in (1, 4, 100_000):  # one row at a time, batches across row groups, each part at once
        hits = search(url, queries, k=7, batch_rows=batch_rows)
        assert_same(hits, expected)
    # A stored row finds itself first (binary: at distance 0, among any exact duplicates the earliest).
    ids, _ = all_rows(url)
    assert hits[0][0].id == ids[5] and hits[1][0].id == ids[40]
    assert hits[0][0].score == (0 if dtype.endswith("binary") else pytest.approx(1, abs=1e-6))


@pytest.mark.unit
def test_hits_carry_their_part_row_and_pass_through_values_including_retry_parts(tmp_path):
    rows = random_rows(60)
    url = make_output(tmp_path / "out", rows, "float32")
    output = OutputAdmin(url)
    names = sorted(n for m in output.done_markers().values() for n in parts_of(m))
    assert any("-retry-" in n for n in names)
    # every committed row, each searched with its own vector, comes back from where it is stored
    table = pa.concat_tables([output.read_part(n).append_column("part", pa.array([n] * output.read_part(n).num_rows))
                              for n in names])
    stored = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    hits = search(url, stored, k=1, batch_rows=5)
    for position, (found,) in enumerate(hits):
        row = table.slice(position, 1).to_pylist()[0]
        assert (found.id, found.part) == (row["id"], row["part"])
        assert output.read_part(found.part).slice(found.row, 1).column("id")[0].as_py() == row["id"]
        assert found.values == {"source": row["source"], "year": row["year"]}
        assert found.chunk is None and found.to_json()["values"] == found.values


@pytest.mark.unit
def test_ties_go_to_the_earlier_part_and_row_deterministically(tmp_path):
    rows = np.tile(random_rows(1), (30, 1))  # every row the same vector
    for dtype in ("float32", "binary"):
        url = make_output(tmp_path / dtype, rows, dtype)
        ids, stored = all_rows(url)
        hits = search(url, stored[:1], k=4, batch_rows=3)[0]
        assert [h.id for h in hits] == ids[:4]
        assert [h.part for h in hits] == sorted(h.part for h in hits)  # the first part by name: u0's


@pytest.mark.unit
def test_a_part_without_a_done_marker_is_not_searched(tmp_path):
    url = make_output(tmp_path / "out", random_rows(30), "float32")
    stray = random_rows(1, seed=9)
    store = OutputAdmin(url)
    table = pa.table({"id": ["uncommitted"], "embedding": vectors.column(stray, "float32", DIM),
                      "source": ["x"], "year": [1]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    store.write_part("u9", sink.getvalue())  # published, then killed before its marker
    assert "uncommitted" not in [h.id for h in search(url, stray, k=30)[0]]


@pytest.mark.unit
def test_a_committed_part_of_another_width_is_named_as_damage(tmp_path):
    url = make_output(tmp_path / "out", random_rows(30), "float32")
    store = OutputAdmin(url)
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": ["x"], "embedding": vectors.column(np.ones((1, 8), np.float32), "float32", 8)}), sink)
    store.mark_done("u5", {"unit_id": "u5", "part": store.write_part("u5", sink.getvalue())})
    with pytest.raises(DamagedRecord, match="part-u5.parquet stores embeddings of type fixed_size_list<element: float>"):
        search(url, random_rows(1))


@pytest.mark.unit
def test_a_committed_part_gone_from_the_folder_is_named(tmp_path):
    url = make_output(tmp_path / "out", random_rows(30), "float32")
    (tmp_path / "out" / OutputAdmin(url).read_marker("u1")["part"]).unlink()  # taken back by a rerun, say
    with pytest.raises(OutputError, match="part-u1.parquet is named by a done-marker but is not there"):
        search(url, random_rows(1))


@pytest.mark.unit
def test_chunk_outputs_give_each_hit_its_window(tmp_path):
    url = make_output(tmp_path / "out", random_rows(45), "int8", chunks=True)
    _, stored = all_rows(url)
    hit = search(url, stored[4], k=2)[0][0]  # the output's 5th row: u0's (parts by name), row 19 as made
    assert (hit.id, hit.chunk, hit.char_start, hit.char_end, hit.chunk_text) == ("doc-6", 1, 100, 220, "window 19")
    assert hit.values == {"source": "file-3.txt", "year": 2019}
    assert read_recipe(url).chunks


@pytest.mark.unit
def test_queries_that_do_not_fit_the_output_and_k_below_one_are_refused(tmp_path):
    url = make_output(tmp_path / "out", random_rows(20), "int8")
    fits = vectors.quantize(random_rows(2), "int8", read_recipe(url).ranges)
    assert len(search(url, fits, k=3)) == 2
    with pytest.raises(UsageError, match="width 20"):
        search(url, fits[:, :10])
    with pytest.raises(UsageError, match="stores int8 vectors but the queries are float32"):
        search(url, random_rows(2))  # not quantized
    with pytest.raises(UsageError, match="at least 1"):
        search(url, fits, k=0)
    binary = make_output(tmp_path / "binary", random_rows(20), "binary")
    with pytest.raises(UsageError, match="width 3"):  # 20 dimensions packed into 3 bytes
        search(binary, np.zeros((1, DIM), np.int8))


@pytest.mark.unit
def test_more_hits_asked_than_rows_gives_every_row_and_empty_parts_count_for_nothing(tmp_path):
    url = make_output(tmp_path / "out", random_rows(12), "ubinary")
    store = OutputAdmin(url)
    sink = io.BytesIO()  # a unit whose every row was rejected publishes a part with no rows
    empty = pa.table({"id": pa.array([], pa.string()), "embedding": vectors.column(np.empty((0, DIM), np.float32),
                                                                                   "ubinary", DIM)})
    pq.write_table(empty, sink)
    store.mark_done("u00", {"unit_id": "u00", "part": store.write_part("u00", sink.getvalue())})
    hits = search(url, np.zeros((1, 3), np.uint8), k=50, batch_rows=5)[0]
    assert sorted(h.id for h in hits) == sorted(all_rows(url)[0]) and len(hits) == 12


@pytest.mark.unit
def test_an_output_with_nothing_committed_gives_no_hits_and_the_command_says_so(tmp_path, capsys):
    store = OutputAdmin(str(tmp_path / "out"))
    store.write_manifest({"fingerprint": {"dim": DIM, "model": "m", "model_revision": "r", "output_dtype": "float32"},
                          "status": "running", "settings": {}})
    assert search(store.url, random_rows(2), k=3) == [[], []]
    assert searching.search_command(["--output", store.url, "anything"]) == 0  # before any model is loaded
    assert "no committed parts yet" in capsys.readouterr().err


@pytest.fixture
def fake_queries(monkeypatch):
    """``docembed.use.query.embed_queries`` replaced: each text 'row N' is the stored row N's vector."""
    def embed_queries(url, texts):
        _, stored = all_rows(url)
        return stored[[int(t.split()[1]) for t in texts]]

    from docembed.use.query import read_texts

    monkeypatch.setitem(sys.modules, "docembed.use.query",
                        types.SimpleNamespace(embed_queries=embed_queries, read_texts=read_texts))


@pytest.mark.unit
def test_the_command_prints_ranks_scores_ids_and_pass_through_columns(tmp_path, capsys, fake_queries):
    url = make_output(tmp_path / "out", random_rows(40), "binary")
    ids, _ = all_rows(url)
    queries = tmp_path / "queries.txt"
    queries.write_text("row 7\n\n")
    assert searching.search_command(["--output", url, "row 3", "--file", str(queries), "-k", "2"]) == 0
    out = capsys.readouterr().out
    first, second = out.split("\n\n")
    assert "Hamming distance in bits, lower is better" in first
    header, top = first.splitlines()[1:3]
    assert header.split() == ["rank", "hamming", "id", "source", "year"]
    assert top.split()[:3] == ["1", "0", ids[3]] and top.split()[3].startswith("file-")
    assert second.splitlines()[2].split()[:3] == ["1", "0", ids[7]]
    assert searching.search_command(["--output", url, "row 3", "--json", "--k", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["rank"], r["metric"]) for r in lines] == [(1, "hamming"), (2, "hamming"), (3, "hamming")]
    assert lines[0]["id"] == ids[3] and lines[0]["score"] == 0 and set(lines[0]["values"]) == {"source", "year"}


@pytest.mark.unit
def test_the_command_refuses_no_queries_and_k_below_one(tmp_path, fake_queries):
    url = make_output(tmp_path / "out", random_rows(10), "float32")
    with pytest.raises(UsageError, match="query texts"):
        searching.search_command(["--output", url])
    with pytest.raises(UsageError, match="at least 1"):
        searching.search_command(["--output", url, "row 1", "-k", "0"])
    with pytest.raises(UsageError, match="--file .*missing.txt: No such file"):
        searching.search_command(["--output", url, "--file", str(tmp_path / "missing.txt")])


# --- end to end: outputs the real pipeline wrote --------------------------------------------------------------

DOCS = 100


@pytest.fixture(scope="module")
def real_outputs(tmp_path_factory, docs):
    """The same 100 documents (two units) embedded by `docembed run` as float32, int8 and binary."""
    from docembed.pipeline.run import run

    tmp = tmp_path_factory.mktemp("search")
    ids, texts = docs
    write_docs(tmp / "in.parquet", ids[:DOCS], texts[:DOCS], row_group_size=50,
               source=[f"src-{i % 5}" for i in range(DOCS)])
    found = {}
    for dtype in ("float32", "int8", "binary"):
        found[dtype] = str(tmp / dtype)
        run(["--input", str(tmp / "in.parquet"), "--output", found[dtype], "--checkpoint-every", "50",
             "--output-dtype", dtype, "--passthrough-columns", "source", "--no-progress"])
    return found, dict(zip(ids[:DOCS], texts[:DOCS]))


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", ["float32", "int8", "binary"])
def test_real_outputs_search_as_brute_force_does(real_outputs, dtype):
    url = real_outputs[0][dtype]
    _, stored = all_rows(url)
    queries = stored[[0, 33, 77]]
    assert_same(search(url, queries, k=10, batch_rows=16), brute_force(url, queries, 10))


@pytest.mark.e2e
def test_a_documents_own_text_finds_itself_first(real_outputs):
    from docembed.use.query import embed_queries

    url, texts = real_outputs[0]["float32"], real_outputs[1]
    chosen = list(texts)[:20:4]
    hits = search(url, embed_queries(url, [texts[i] for i in chosen]), k=3)
    assert [h[0].id for h in hits] == chosen
    assert all(h[0].score > 0.99 for h in hits)


@pytest.mark.e2e
def test_the_cli_prints_the_nearest_ids(real_outputs):
    url, texts = real_outputs[0]["float32"], real_outputs[1]
    target = list(texts)[10]
    done = subprocess.run([sys.executable, "-m", "docembed", "search", "--output", url, texts[target], "-k", "3"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split() == ["rank", "cosine", "id", "source"]
    ranked = [line.split() for line in lines[2:5]]
    assert [r[0] for r in ranked] == ["1", "2", "3"] and ranked[0][2] == target
    table = read_output(url)
    assert ranked[0][3] == table.filter(pa.compute.equal(table.column("id"), target)).column("source")[0].as_py()
