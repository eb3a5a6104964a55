"""Search: the exact nearest neighbours of query vectors among an output's stored vectors
(``docembed search``), streaming the output's parts so that memory stays bounded on outputs larger
than RAM.

Inputs: an output folder (any ``--output-dtype``; a growing one too: what is committed when the search
starts) and query vectors already in the output's stored dtype and width (``docembed.use.query.
embed_queries`` makes them from texts exactly as the output's vectors were made). Output: per query,
its ``k`` best ``Hit``s, best first, each with the row's id, its score, the part and row it came from,
its pass-through values and, for ``--long-docs chunks`` outputs, its chunk and character offsets.

Scores, by stored dtype:

* ``float32``, ``float16``: cosine similarity, higher is better (both sides divided by their norms, so
  an output written without ``normalize`` ranks the same; a zero vector scores 0).
* ``int8``, ``uint8``: cosine similarity of the values decoded to their buckets' centres with the
  output's calibration (``vectors.dequantize``), queries decoded alike.
* ``binary``, ``ubinary``: Hamming distance between the packed bits, LOWER is better (the printout's
  column says ``hamming``). ``binary``'s shift by -128 flips only each byte's top bit in both sides, so
  the XOR of the stored bytes is the XOR of the bits.

Equal scores are ordered by position in the output: parts in name order (the order of their unit ids),
then row order, earlier first; so ties never depend on the batch size or on the order files are listed.

Only parts a done-marker names are read (``layout.parts_of``): a part without a marker is not
committed. Each part is read a batch of rows at a time, the ``embedding`` column alone; a running top
``k`` per query merges each batch's best (``np.partition``) with the best so far. Memory is bounded by
the batch (``batch_rows`` x width, read through a fixed buffer, so a large part is not read whole) and
k, not by the output: docs/PERFORMANCE.md has the figures. Ids, pass-through and chunk columns are read
afterwards, for the final hits' rows only. Exact search costs one pass over every vector per call: for
many queries per second, index the same Parquet files with FAISS, DuckDB's vss extension or LanceDB
(docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import logging
import sys

import numpy as np
import pyarrow.parquet as pq

from docembed import vectors
from docembed.errors import DamagedRecord, OutputError, UsageError
from docembed.store.admin import OutputAdmin
from docembed.store.layout import CHUNK_COLUMNS, parts_of
from docembed.use.recipe import Recipe, read_recipe

log = logging.getLogger(__name__)

# Rows decoded at a time: 24 MiB of float32 at 384 dimensions. A quarter of it cut the peak memory by
# about 40% for 30% more CPU time; twice it gained little.
BATCH_ROWS = 16384
READ_BUFFER = 8 << 20  # parts are read through a buffer of this size, not a whole column chunk at once
# numpy's dtype of each stored dtype's values (the embedding column's list value type).
_NUMPY = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
          "binary": np.int8, "ubinary": np.uint8}
CHUNK_TEXT = "chunk_text"


@dataclasses.dataclass(frozen=True)
class Hit:
    """One nearest stored row: ``score`` is a cosine (higher is better) or, for the binary dtypes, a
    Hamming distance in bits (lower is better); ``part`` and ``row`` say where it is stored;
    ``values`` holds its pass-through columns. For chunk outputs, the window's ``chunk`` number and its
    ``char_start``/``char_end`` in the document (and ``chunk_text`` where the output keeps it)."""

    id: str
    score: float
    part: str
    row: int
    values: dict
    chunk: int | None = None
    char_start: int | None = None
    char_end: int | None = None
    chunk_text: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k in ("id", "score")}


def metric(dtype: str) -> str:
    """What the scores of an output of ``dtype`` are: "hamming" (lower is better) or "cosine"."""
    return "hamming" if dtype.endswith("binary") else "cosine"


# --- the search ----------------------------------------------------------------------------------------


def search(url: str, queries: np.ndarray, k: int = 10, recipe: Recipe | None = None,
           batch_rows: int = BATCH_ROWS) -> list[list[Hit]]:
    """The ``k`` nearest committed rows of the output at ``url`` to each query, best first.

    Args:
        url: the output folder (any URL docembed writes to).
        queries: an (n, width) array (or one vector) in the output's stored dtype, as ``embed_queries``
            returns: float for float outputs; the stored integers for int8, uint8, binary and ubinary.
        k: hits per query (fewer where the output holds fewer rows); at least 1.
        recipe: the output's ``read_recipe(url)``, where the caller has read it already.
        batch_rows: rows scored at a time; bounds the memory, not the result.
    """
    if k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    if batch_rows < 1:
        raise UsageError(f"batch rows must be at least 1, got {batch_rows}")
    recipe = recipe or read_recipe(url)
    scorer = Scorer(recipe, queries)
    output = OutputAdmin(url)
    parts = committed_parts(output)
    best = [TopK(k) for _ in range(scorer.count)]
    starts = []  # each part's first position in the output's row order
    position = 0
    for name in parts:
        starts.append(position)
        for batch in _embedding_batches(output, name, recipe, batch_rows):
            positions = np.arange(position, position + len(batch), dtype=np.int64)
            for top, row_scores in zip(best, scorer.scores(batch)):
                top.add(row_scores, positions)
            position += len(batch)
    return _hits(output, recipe, parts, starts, best)


def committed_parts(output: OutputAdmin) -> list[str]:
    """The part files the done-markers name, in name order (the order ties are broken in)."""
    markers, unreadable = output.read_markers()
    if unreadable:  # docembed writes markers whole: these are damaged, and `docembed verify` says so
        log.warning("%s: %d done-marker(s) cannot be read; their units are not searched: %s", output.url,
                    len(unreadable), ", ".join(sorted(unreadable)[:5]))
    return sorted(name for marker in markers.values() for name in parts_of(marker))


class Scorer:
    """Scores batches of stored values against the queries, higher is better: cosine, or minus the
    Hamming distance."""

    def __init__(self, recipe: Recipe, queries: np.ndarray):
        self.dtype = recipe.output_dtype
        if self.dtype in vectors.CALIBRATED:
            # Decoding is affine per dimension (value -> offset + value * step): both taken from
            # vectors.dequantize itself, so that the formula stays there, then applied in place, which
            # is three times faster than calling it on every batch.
            # (The step is measured over 100 values so that float32 rounding of the two ends hardly shows.)
            ends = vectors.dequantize(np.array([[0], [100]], np.int16).repeat(recipe.dim, 1), self.dtype, recipe.ranges)
            self.offset = ends[0]
            self.step = ((ends[1].astype(np.float64) - ends[0]) / 100).astype(np.float32)
        queries = check_queries(recipe, queries)
        self.count = len(queries)
        if self.hamming:
            self.queries = _words(queries)
        else:
            self.queries = _unit_rows(self._floats(queries))

    @property
    def hamming(self) -> bool:
        return metric(self.dtype) == "hamming"

    def scores(self, values: np.ndarray) -> np.ndarray:
        """(queries, rows) scores of a batch of stored values."""
        if self.hamming:
            stored = _words(values)
            # One query at a time: the (rows, words) XOR stays the batch's size, not queries times it.
            return np.stack([-np.bitwise_count(stored ^ q).sum(axis=1, dtype=np.int32) for q in self.queries])
        rows = self._floats(values)
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        scores = (self.queries @ rows.T) / np.where(norms == 0, 1, norms)
        scores[np.isnan(scores)] = -np.inf  # a vector holding NaN or inf ranks last, not anywhere
        return scores

    def _floats(self, values: np.ndarray) -> np.ndarray:
        if self.dtype in vectors.CALIBRATED:
            decoded = values.astype(np.float32)
            decoded *= self.step
            decoded += self.offset
            return decoded
        return values.astype(np.float32, copy=False)


def check_queries(recipe: Recipe, queries: np.ndarray) -> np.ndarray:
    """``queries`` as an (n, width) array of the stored dtype, or a UsageError saying what is wrong."""
    queries = np.asarray(queries)
    if queries.ndim == 1:
        queries = queries[None, :]
    dtype = recipe.output_dtype
    if queries.ndim != 2 or queries.shape[1] != recipe.width:
        raise UsageError(
            f"the query vectors have shape {queries.shape}, but {recipe.url} stores {dtype} vectors of width "
            f"{recipe.width} ({recipe.dim} dimensions); make them with docembed.use.query.embed_queries on this output")
    stored = np.dtype(_NUMPY[dtype])
    if stored.kind in "iu":
        if queries.dtype.kind not in "iu" or (queries.size and (queries.min() < np.iinfo(stored).min
                                                                or queries.max() > np.iinfo(stored).max)):
            raise UsageError(
                f"{recipe.url} stores {dtype} vectors but the queries are {queries.dtype} values; quantize them as the "
                f"output's were (docembed.vectors.quantize with the recipe's ranges, or embed_queries does)")
    elif queries.dtype.kind != "f":
        raise UsageError(f"{recipe.url} stores {dtype} vectors but the queries are {queries.dtype} values")
    return queries.astype(stored, copy=False)


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1, norms)


def _words(values: np.ndarray) -> np.ndarray:
    """Packed bits as unsigned words for XOR and popcount: 64-bit words where the width allows (eight
    times fewer elements to count), bytes otherwise."""
    raw = np.ascontiguousarray(values).view(np.uint8)
    return raw.view(np.uint64) if raw.shape[-1] % 8 == 0 else raw


class TopK:
    """The best ``k`` (score, position) pairs seen so far for one query; ties go to the earlier position."""

    def __init__(self, k: int):
        self.k = k
        self.scores = np.empty(0, np.float64)
        self.positions = np.empty(0, np.int64)

    def add(self, scores: np.ndarray, positions: np.ndarray) -> None:
        scores, positions = _best(scores, positions, self.k)
        self.scores, self.positions = _best(np.concatenate([self.scores, scores]),
                                            np.concatenate([self.positions, positions]), self.k)


def _best(scores: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest scores with their positions, best first, ties to the lower position. A partition
    finds the k-th score in linear time; every row scoring at least that is kept (so rows tied at the
    boundary are not dropped arbitrarily), then sorted."""
    if len(scores) > k:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        keep = np.flatnonzero(scores >= kth)
        scores, positions = scores[keep], positions[keep]
    order = np.lexsort((positions, -scores))[:k]
    return scores[order].astype(np.float64), positions[order]


def _embedding_batches(output: OutputAdmin, name: str, recipe: Recipe, batch_rows: int):
    """A part's stored vectors, ``batch_rows`` rows at a time, as (rows, width) arrays."""
    with _opened(output, name) as handle:
        parquet = pq.ParquetFile(handle, buffer_size=READ_BUFFER)
        found = parquet.schema_arrow.field("embedding").type
        if getattr(found, "list_size", None) != recipe.width:
            raise DamagedRecord(f"{output.url}/{name} stores embeddings of type {found}, not the manifest's "
                                f"{recipe.output_dtype} x {recipe.width}: run `docembed verify --output {output.url}`")
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=["embedding"]):
            values = batch.column(0).flatten().to_numpy(zero_copy_only=False)
            yield values.reshape(-1, recipe.width)


def _opened(output: OutputAdmin, name: str):
    """A committed part, opened; one gone since the markers were read is named as such."""
    try:
        return output.open(name)
    except FileNotFoundError as exc:
        raise OutputError(f"{output.url}/{name} is named by a done-marker but is not there: a run took its unit back "
                          f"while this search ran (search again), or the output is damaged (`docembed verify`)") from exc


# --- the hits' rows ---------------------------------------------------------------------------------------


def _hits(output: OutputAdmin, recipe: Recipe, parts: list[str], starts: list[int],
          best: list[TopK]) -> list[list[Hit]]:
    """Each query's best positions as Hits: the rows' other columns read, one pass per part that holds
    a hit, whatever the number of queries."""
    wanted: dict[str, set[int]] = {}
    for top in best:
        for position in top.positions.tolist():
            index = bisect.bisect_right(starts, position) - 1
            wanted.setdefault(parts[index], set()).add(position - starts[index])
    rows = {name: _read_rows(output, name, recipe, sorted(found)) for name, found in wanted.items()}
    hamming = metric(recipe.output_dtype) == "hamming"
    results = []
    for top in best:
        hits = []
        for score, position in zip(top.scores.tolist(), top.positions.tolist()):
            index = bisect.bisect_right(starts, position) - 1
            name, row = parts[index], position - starts[index]
            record = dict(rows[name][row])
            extra = {c: record.pop(c, None) for c in (*CHUNK_COLUMNS, CHUNK_TEXT)}
            hits.append(Hit(id=record.pop("id"), score=int(-score) if hamming else float(score), part=name, row=row,
                            values=record, **extra))
        results.append(hits)
    return results


def _read_rows(output: OutputAdmin, name: str, recipe: Recipe, rows: list[int]) -> dict[int, dict]:
    """row -> {column: value} of a part's ``rows`` (sorted), for every column but the embedding."""
    with _opened(output, name) as handle:
        parquet = pq.ParquetFile(handle, buffer_size=READ_BUFFER)
        present = set(parquet.schema_arrow.names)
        columns = [c for c in ("id", *CHUNK_COLUMNS, CHUNK_TEXT, *recipe.passthrough_columns) if c in present]
        found, start, pending = {}, 0, list(rows)
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(dict.fromkeys(columns))):
            end = start + batch.num_rows
            here = [r for r in pending if r < end]
            if here:
                taken = batch.take([r - start for r in here]).to_pylist()
                found.update(zip(here, taken))
                pending = pending[len(here):]
            if not pending:
                break
            start = end
    return found


# --- the command --------------------------------------------------------------------------------------


def search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="docembed search",
        description="The exact nearest neighbours of query texts among an output's committed vectors: the texts "
                    "are embedded as the output's vectors were (model, prompt, window, dimensions, dtype), then "
                    "every part is streamed once. Scores: cosine (float and int8/uint8 outputs, higher is better) "
                    "or Hamming distance in bits (binary/ubinary outputs, lower is better).")
    p.add_argument("--output", required=True, help="the output folder to search (the --output of a run)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="query texts (quote each); --file adds its lines after them")
    p.add_argument("--file", default=None,
                   help="a UTF-8 text file with one query per line (blank lines skipped); - reads standard input")
    p.add_argument("-k", "--k", type=int, default=10, help="hits per query (default 10)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per hit: query, rank, id, score, metric, part, row, pass-through "
                        "values (and chunk offsets)")
    p.add_argument("--batch-rows", type=int, default=BATCH_ROWS, metavar="N",
                   help=f"stored rows scored at a time; bounds memory (default {BATCH_ROWS})")
    return p


def search_command(argv: list[str]) -> int:
    # Imported here: the module that loads models is needed only by the command (it loads one only in
    # embed_queries, once the texts, -k and the output are found fine).
    from docembed.use.query import embed_queries, read_texts

    args = search_parser().parse_args(argv)
    try:
        texts = read_texts(args)  # as `docembed query` reads them
    except OSError as exc:
        raise UsageError(f"search: --file {args.file}: {exc.strerror or exc}") from exc
    if args.k < 1:
        raise UsageError(f"search: -k must be at least 1, got {args.k}")  # before a model is loaded
    recipe = read_recipe(args.output)
    if not committed_parts(OutputAdmin(args.output)):  # say so before loading a model for nothing
        print(f"docembed search: {args.output} has no committed parts yet: nothing to search", file=sys.stderr)
        return 0
    results = search(args.output, embed_queries(args.output, texts), args.k, recipe, args.batch_rows)
    kind = metric(recipe.output_dtype)
    if args.json:
        for text, hits in zip(texts, results):
            for rank, hit in enumerate(hits, 1):
                print(json.dumps({"query": text, "rank": rank, "metric": kind, **hit.to_json()}, default=str))
    else:
        print("\n\n".join(format_hits(text, hits, recipe) for text, hits in zip(texts, results)))
    return 0




def format_hits(text: str, hits: list[Hit], recipe: Recipe) -> str:
    """One query's hits as a table: rank, score, id, chunk offsets (chunk outputs), pass-through columns."""
    kind = metric(recipe.output_dtype)
    note = "Hamming distance in bits, lower is better" if kind == "hamming" else "cosine similarity, higher is better"
    header = ["rank", kind, "id", *(("chunk", "chars") if recipe.chunks else ()), *recipe.passthrough_columns]
    rows = []
    for rank, hit in enumerate(hits, 1):
        score = str(hit.score) if kind == "hamming" else f"{hit.score:.4f}"
        chunk = (str(hit.chunk), f"{hit.char_start}-{hit.char_end}") if recipe.chunks else ()
        rows.append([str(rank), score, hit.id, *chunk, *(_cell(hit.values.get(c)) for c in recipe.passthrough_columns)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"query: {_cell(text, 200)}  ({note})", "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines if rows else [*lines[:1], "  (no hits)"])


def _cell(value, limit: int = 60) -> str:
    """A value on one line, cut to ``limit`` characters."""
    text = " ".join(str(value).split()) if value is not None else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"
