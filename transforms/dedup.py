"""Dedup: find repeated ids as the job's first stage, within the input and against the output.

Consumes the work units to do (and the output's parts); produces ``(source, (row, message))`` for
every row whose id an earlier occurrence already holds. ``ReadUnit`` takes them as a side input and
rejects those rows as ``duplicate_id`` (``--on-duplicate-id keep-first``). Under ``error``, any
repeat fails the job here, naming examples, before a single document is embedded.

The first occurrence of an id wins: one already in the output (an earlier run, or units done before a
kill), otherwise the first in input order (files sorted by URL, then rows). Only ids are read, never
text, so an id whose first occurrence is later rejected (empty text, say) still counts as taken. Null
ids are left to the reader, which rejects them as ``null_id``.

It runs on the workers: a GroupByKey spreads the ids over the cluster, so the launcher never holds
the corpus's ids, however many rows there are.
"""

from __future__ import annotations

import heapq

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transforms import storage
from transforms.checkpoint import UnitStore
from transforms.errors import InputError
from transforms.records import EmbedSettings, WorkUnit

# Errors pyarrow raises for undecodable data pages (the footer was fine at planning).
DECODE_ERRORS = (pa.ArrowException, OSError, UnicodeDecodeError)
IN_OUTPUT = ("", -1)  # where an id already in the output sits: before every input row
EXAMPLES = 5


def read_ids(url: str, id_column: str, skip_bad_files: bool) -> pa.ChunkedArray:
    """The file's ids as strings, row group by row group (see ``_group_ids``)."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        return _group_ids(parquet, url, range(parquet.num_row_groups), id_column, skip_bad_files)


def unit_ids(unit: WorkUnit, settings: EmbedSettings):
    """``(id, (source, row))`` for each row of ``unit`` that has an id (of a retry of rejections: each
    row to retry, whose id may have been embedded from another file since it was rejected)."""
    id_column, skip_bad_files = settings.id_column, settings.skip_bad_files
    only = UnitStore(settings.output).rejections_to_retry(unit.unit_id, unit.retry)[2] if unit.retry else None
    fs, path = storage.filesystem(settings.locate(unit.source))
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        ids = _group_ids(parquet, unit.source, unit.row_groups, id_column, skip_bad_files)
        first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(unit.row_groups[0]))
    for offset, ident in enumerate(ids.slice(unit.row_start - first_row, unit.rows).to_pylist()):
        if ident is not None and (only is None or unit.row_start + offset in only):
            yield ident, (unit.source, unit.row_start + offset)


def _group_ids(parquet: pq.ParquetFile, url: str, groups, id_column: str, skip_bad_files: bool) -> pa.ChunkedArray:
    """The ids of ``groups`` as strings. A row group whose ids cannot be decoded is an error naming
    it, or with ``skip_bad_files`` null ids (the reader then rejects its rows)."""
    chunks = []
    for group in groups:
        try:
            chunks.append(pc.cast(parquet.read_row_group(group, columns=[id_column]).column(0), pa.string()))
        except DECODE_ERRORS as exc:
            if not skip_bad_files:
                raise InputError(f"{url}: row group {group} cannot be read ({exc}); fix or remove the file, "
                                 "or pass --skip-bad-files") from exc
            chunks.append(pa.chunked_array([pa.nulls(parquet.metadata.row_group(group).num_rows, pa.string())]))
    return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], pa.string())


def part_ids(store: UnitStore, name: str):
    """``(id, IN_OUTPUT)`` for each row of a committed part."""
    with store.open(name) as handle:
        for ident in pq.read_table(handle, columns=["id"]).column("id").to_pylist():
            yield ident, IN_OUTPUT


def repeats(ident: str, places) -> list[tuple[str, tuple[int, str]]]:
    """The places of ``ident`` that repeat its first occurrence, as ``(source, (row, message))``."""
    places = sorted(set(places))
    first, later = places[0], [p for p in places[1:] if p != IN_OUTPUT]
    if first == IN_OUTPUT:
        return [(s, (r, f"id {ident!r} at {s} row {r} is already in the output")) for s, r in later]
    return [(s, (r, f"id {ident!r} at {s} row {r} repeats {first[0]} row {first[1]}")) for s, r in later]


class CountWithExamples(beam.CombineFn):
    """How many repeats, and the messages of the first few in input order."""

    def create_accumulator(self):
        return 0, []

    def add_input(self, accumulator, repeat):
        count, examples = accumulator
        source, (row, message) = repeat
        return count + 1, heapq.nsmallest(EXAMPLES, examples + [(source, row, message)])

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        merged = [e for _, examples in accumulators for e in examples]
        return sum(c for c, _ in accumulators), heapq.nsmallest(EXAMPLES, merged)

    def extract_output(self, accumulator):
        return accumulator


def fail_on_repeats(summary) -> list:
    """``--on-duplicate-id error``: nothing when no id repeats; otherwise the job fails here."""
    count, examples = summary
    if count:
        raise InputError(
            f"{count} rows repeat an id ({'; '.join(m for _, _, m in examples)}); pass --on-duplicate-id "
            "keep-first to embed the first occurrence and reject the others as duplicate_id"
        )
    return []


class FindDuplicates(beam.PTransform):
    """PCollection[WorkUnit] (to do) -> PCollection[(source, (row, message))] of rows to reject."""

    def __init__(self, settings: EmbedSettings):
        super().__init__()
        self._settings = settings

    def expand(self, units):
        store, s = UnitStore(self._settings.output), self._settings
        in_input = units | "ReadIds" >> beam.FlatMap(unit_ids, s)
        in_output = (units.pipeline
                     | "OutputParts" >> beam.Create([None], reshuffle=False)
                     | "ListParts" >> beam.FlatMap(lambda _: store.part_files())
                     | "SpreadParts" >> beam.Reshuffle()
                     | "ReadOutputIds" >> beam.FlatMap(lambda name: part_ids(store, name)))
        repeated = ((in_input, in_output) | "AllIds" >> beam.Flatten() | "GroupById" >> beam.GroupByKey()
                    | "Repeats" >> beam.FlatMapTuple(repeats))
        if self._settings.on_duplicate_id == "error":
            return (repeated | "CountRepeats" >> beam.CombineGlobally(CountWithExamples())
                    | "FailOnRepeats" >> beam.FlatMap(fail_on_repeats))
        return repeated
