"""Dedup: find repeated ids once per run, before any document is embedded, as a job of its own.

Consumes the run's plan (the units to do) and the output as it was when the run was planned (its
parts and its ``duplicate_id`` rejections, recorded in ``_plans/<run_id>/`` by the launcher); writes,
for each unit holding rows whose id an earlier occurrence already holds, ``repeats/<unit_id>.json``
under the plan (``UnitStore.write_repeats``). ``ReadUnit`` reads its unit's file and rejects those
rows as ``duplicate_id`` (``--on-duplicate-id keep-first``). Under ``error`` any repeat fails this job,
naming examples, before a single document is embedded.

The first occurrence of an id wins: one already in the output (an earlier run, or units done before a
kill), otherwise the first in input order (files sorted by URL, then rows). Only ids are read, never
text, so an id whose first occurrence is later rejected (empty text, say) still counts as taken. Null
ids are left to the reader, which rejects them as ``null_id``. An id rejected as ``duplicate_id`` by an
earlier run that no part holds and no unit to do brings (its first occurrence was lost) fails the job
too, naming the rows: ``--retry-rejects duplicate_id`` embeds them.

Why a job of its own, reading records and not listings: a runner may run any task again (Dask,
Flink and Spark re-run the tasks of a lost worker, finished ones included), and a listing of the
output taken then would count this run's own commits as "already in the output". Everything here is
a function of the plan's records and the input, so every re-run writes the same files; and the
embedding job reads them as files, not as a side input that some runners rebuild in every task.

It runs on the workers: a GroupByKey spreads the ids over the cluster, so the launcher never holds
the corpus's ids, however many rows there are; a worker holds the ids of one shuffle group at a time.
"""

from __future__ import annotations

import collections
import heapq

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from docembed.store import storage
from docembed.store.units import UnitStore
from docembed.errors import InputError
from docembed.records import EmbedSettings, WorkUnit
from docembed.text import agree, plural

# Errors pyarrow raises for undecodable data pages (the footer was fine at planning).
DECODE_ERRORS = (pa.ArrowException, OSError, UnicodeDecodeError)
# Where an id occurs, as (rank, source, row, unit_id); the rank orders the kinds before input order.
IN_OUTPUT, TO_DO, REJECTED = 0, 1, 2  # in a part; in a unit to do; rejected as duplicate_id earlier
LOST = ""  # the key of lost rows among the per-unit keys (unit ids are never empty)
EXAMPLES = 5
IDS_PER_PASS = 4_000_000  # find_here: about 800 MB of ids and places at once (bench/dedup.py)
ROW_SPAN = 2**40  # find_here's codes: a unit's index times this, plus the row in its file


def read_ids(url: str, id_column: str, skip_bad_files: bool) -> pa.ChunkedArray:
    """The file's ids as strings, row group by row group (see ``_group_ids``)."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        return _group_ids(parquet, url, range(parquet.num_row_groups), id_column, skip_bad_files)


def unit_ids(unit: WorkUnit, settings: EmbedSettings):
    """``(id, place)`` for each row of ``unit`` that has an id (of a retry of rejections: each row to
    retry, whose id may have been embedded from another file since it was rejected)."""
    id_column, skip_bad_files = settings.id_column, settings.skip_bad_files
    only = UnitStore(settings.output).rejections_to_retry(unit.unit_id, unit.retry)[2] if unit.retry else None
    fs, path = storage.filesystem(settings.locate(unit.source))
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        ids = _group_ids(parquet, unit.source, unit.row_groups, id_column, skip_bad_files)
        first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(unit.row_groups[0]))
    for offset, ident in enumerate(ids.slice(unit.row_start - first_row, unit.rows).to_pylist()):
        row = unit.row_start + offset
        if ident is not None and (only is None or row in only):
            yield ident, (TO_DO, unit.source, row, unit.unit_id)


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


def output_ids(store: UnitStore, entry: dict):
    """``(id, place)`` for each row of one file the output held when the run was planned
    (``OutputAdmin.write_snapshot``): a part's rows, or the ``duplicate_id`` rows of a rejections file."""
    part = entry["kind"] == "part"
    with store.open(entry["name"]) as handle:  # never the vectors
        table = pq.read_table(handle, columns=["id"] if part else ["id", "source", "row_index", "reason"])
    if part:
        for ident in table.column("id").to_pylist():
            yield ident, (IN_OUTPUT, "", -1, "")
        return
    table = table.filter(pc.equal(table.column("reason"), "duplicate_id"))
    for ident, source, row in zip(*(table.column(c).to_pylist() for c in ("id", "source", "row_index"))):
        yield ident, (REJECTED, source, row, "")


def repeats(ident: str, places) -> list[tuple[str, tuple[str, int, str]]]:
    """The places of ``ident`` that repeat its first occurrence, as ``(unit_id, (source, row, message))``;
    where only earlier ``duplicate_id`` rejections hold it, the first of them as ``(LOST, ...)``."""
    places = sorted(set(places))
    todo = [p for p in places if p[0] == TO_DO]
    if places[0][0] == IN_OUTPUT:
        return [(u, (s, r, f"id {ident!r} at {s} row {r} is already in the output")) for _, s, r, u in todo]
    if todo:
        (_, s0, r0, _), later = todo[0], todo[1:]
        return [(u, (s, r, f"id {ident!r} at {s} row {r} repeats {s0} row {r0}")) for _, s, r, u in later]
    _, s, r, _ = places[0]  # rejected as a repeat of an occurrence the output no longer holds
    return [(LOST, (s, r, f"id {ident!r} at {s} row {r} was rejected as duplicate_id, but no part holds the id"))]


class WriteRepeats(beam.DoFn):
    """(unit_id, [(source, row, message)]) -> (kind, (count, examples)): the unit's repeats written to
    the plan for ``ReadUnit``; lost rows only counted. Writing the same file again is harmless."""

    def __init__(self, settings: EmbedSettings):
        self._settings = settings
        self._store = UnitStore(settings.output)

    def process(self, keyed):
        unit_id, found = keyed
        found = sorted(found)
        if unit_id != LOST:
            self._store.write_repeats(self._settings.run_id, unit_id, {r: m for _, r, m in found})
        yield ("lost" if unit_id == LOST else "repeated"), (len(found), found[:EXAMPLES])


class CountWithExamples(beam.CombineFn):
    """How many, and the first few in input order."""

    def create_accumulator(self):
        return 0, []

    def add_input(self, accumulator, counted):
        return self.merge_accumulators([accumulator, counted])

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        merged = [e for _, examples in accumulators for e in examples]
        return sum(c for c, _ in accumulators), heapq.nsmallest(EXAMPLES, merged)

    def extract_output(self, accumulator):
        return accumulator


def judge(counted, on_duplicate_id: str) -> list:
    """The job fails here on lost rows, and under ``--on-duplicate-id error`` on any repeat."""
    kind, (count, examples) = counted
    said = "; ".join(m for _, _, m in examples)
    if kind == "lost":
        raise InputError(f"{plural(count, 'row')} rejected as duplicate_id by an earlier run "
                         f"{agree(count, 'has', 'have')} no row with {agree(count, 'its', 'their')} id in the output ({said}): "
                         f"rerun with --retry-rejects duplicate_id to embed {agree(count, 'it', 'them')}")
    if on_duplicate_id == "error":
        raise InputError(f"{plural(count, 'row')} {agree(count, 'repeats', 'repeat')} an id ({said}); pass "
                         "--on-duplicate-id keep-first to embed the first occurrence and reject the others as "
                         "duplicate_id")
    return [counted]


def find_here(units: list[WorkUnit], output: list[dict], settings: EmbedSettings,
              ids_per_pass: int = IDS_PER_PASS) -> None:
    """The duplicate-id check in this process, without a Beam job: for local runners, whose
    GroupByKey would hold every id in this process, and whose job would cost its start-up on every
    run. The same steps as ``FindDuplicates``; raises as ``judge`` does. Memory stays bounded: the ids
    are grouped in passes over the input and the output, each keeping only the ids of one hash
    bucket, about ``ids_per_pass`` of them (the rows to do and the output's rows, over the passes).
    An id seen once costs its string, a dictionary slot and an int (``_codes``)."""
    store, found = UnitStore(settings.output), collections.defaultdict(list)
    passes = max(1, -(-(sum(u.rows for u in units) + sum(e.get("rows", 0) for e in output)) // ids_per_pass))
    for bucket in range(passes):
        first, more = {}, collections.defaultdict(list)
        for ident, code in _codes(units, output, store, settings):
            if passes > 1 and hash(ident) % passes != bucket:
                continue
            if first.get(ident) is None:
                first[ident] = code
            else:
                more[ident].append(code)
        for ident, code in first.items():
            if ident in more or isinstance(code, tuple):  # repeated, or rejected earlier (perhaps lost)
                places = [_place(c, units) for c in (code, *more.get(ident, ()))]
                for key, value in repeats(ident, places):
                    found[key].append(value)
        del first, more
    writer, counter, counted = WriteRepeats(settings), CountWithExamples(), {}
    for keyed in found.items():
        for kind, count in writer.process(keyed):
            counted[kind] = counter.merge_accumulators([counted.get(kind, (0, [])), count])
    for kind in sorted(counted):  # "lost" first
        judge((kind, counted[kind]), settings.on_duplicate_id)


def _codes(units: list[WorkUnit], output: list[dict], store: UnitStore, settings: EmbedSettings):
    """``(id, code)`` of every occurrence, its place compacted for ``find_here``: a row to do as one
    int (its unit's index in ``units`` and its row), a row in the output as -1, an earlier rejection
    as its place (they are few)."""
    for index, unit in enumerate(units):
        for ident, (_, _, row, _) in unit_ids(unit, settings):
            yield ident, index * ROW_SPAN + row
    for entry in output:
        for ident, place in output_ids(store, entry):
            yield ident, (-1 if place[0] == IN_OUTPUT else place)


def _place(code, units: list[WorkUnit]) -> tuple:
    if isinstance(code, tuple):
        return code
    if code < 0:
        return IN_OUTPUT, "", -1, ""
    unit = units[code // ROW_SPAN]
    return TO_DO, unit.source, code % ROW_SPAN, unit.unit_id


class FindDuplicates(beam.PTransform):
    """(PCollection[WorkUnit] to do, PCollection of the output's files as planned) ->
    PCollection[(kind, (count, examples))], having written every unit's repeats to the plan."""

    def __init__(self, settings: EmbedSettings):
        super().__init__()
        self._settings = settings

    def expand(self, inputs):
        units, output = inputs
        s, store = self._settings, UnitStore(self._settings.output)
        in_input = units | "ReadIds" >> beam.FlatMap(unit_ids, s)
        in_output = output | "ReadOutputIds" >> beam.FlatMap(lambda entry: output_ids(store, entry))
        return ((in_input, in_output) | "AllIds" >> beam.Flatten() | "GroupById" >> beam.GroupByKey()
                | "Repeats" >> beam.FlatMapTuple(repeats) | "ByUnit" >> beam.GroupByKey()
                | "WriteRepeats" >> beam.ParDo(WriteRepeats(s)) | "Count" >> beam.CombinePerKey(CountWithExamples())
                | "Judge" >> beam.FlatMap(judge, s.on_duplicate_id))
