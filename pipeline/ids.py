"""Ids: find repeated ids before any work, within the input and against what the output already holds.

The first occurrence of an id wins: one already embedded in the output (by an earlier run, or by
units done before a kill), otherwise the first in input order (files sorted by URL, then rows).
Only ids are read here, never text, so an id whose first occurrence is later rejected (empty text,
say) still counts as taken. Null ids are left to the reader, which rejects them as ``null_id``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.plan import Plan
from transforms import storage
from transforms.checkpoint import OutputFolder
from transforms.errors import InputError
from transforms.read import DECODE_ERRORS
from transforms.records import WorkUnit

EXAMPLES = 5


def mark_duplicates(plan: Plan, todo: list[WorkUnit], output: OutputFolder, id_column: str,
                    policy: str, skip_bad_files: bool = False) -> list[WorkUnit]:
    """``todo`` with each unit's ``duplicate_rows`` filled in (policy ``keep-first``); with policy
    ``error``, raises InputError with examples when any id repeats."""
    if not todo:
        return todo
    rows = _todo_rows(plan, todo, id_column, skip_bad_files)
    ids = rows.column("id")
    first = pc.index_in(ids, value_set=ids)  # index of each id's first row
    repeated = pc.not_equal(first, pa.array(np.arange(rows.num_rows), pa.int32()))
    in_output = pc.is_in(ids, value_set=_output_ids(output))
    duplicate = pc.or_(repeated, in_output)
    if not pc.any(duplicate).as_py():
        return todo
    dup_index = np.flatnonzero(duplicate.to_numpy(zero_copy_only=False))
    messages = [_message(rows, i, first[i].as_py(), in_output[i].as_py()) for i in dup_index]
    if policy == "error":
        raise InputError(
            f"{len(dup_index)} rows repeat an id ({'; '.join(messages[:EXAMPLES])}); pass "
            "--on-duplicate-id keep-first to embed the first occurrence and reject the others as duplicate_id"
        )
    sources, row_numbers = rows.column("source").to_pylist(), rows.column("row").to_pylist()
    by_source: dict[str, dict[int, str]] = {}
    for i, message in zip(dup_index, messages):
        by_source.setdefault(sources[i], {})[row_numbers[i]] = message
    return [_with_duplicates(unit, by_source.get(unit.source, {})) for unit in todo]


def _todo_rows(plan: Plan, todo: list[WorkUnit], id_column: str, skip_bad_files: bool) -> pa.Table:
    """id, source and row of every row of the units to do that has an id, in input order."""
    ranges: dict[str, list[WorkUnit]] = {}
    for unit in todo:
        ranges.setdefault(unit.source, []).append(unit)
    tables = []
    for file in plan.files:  # plan order: files sorted by URL
        if file.url not in ranges:
            continue
        ids = read_ids(file.url, id_column, skip_bad_files)
        wanted = np.zeros(file.rows, dtype=bool)
        for unit in ranges[file.url]:
            wanted[unit.row_start:unit.row_end] = True
        rows = pa.array(np.flatnonzero(wanted), pa.int64())
        table = pa.table({"id": ids.take(rows), "source": pa.array([file.url] * len(rows), pa.string()),
                          "row": rows})
        tables.append(table.filter(pc.is_valid(table.column("id"))))
    return pa.concat_tables(tables).combine_chunks()


def read_ids(url: str, id_column: str, skip_bad_files: bool) -> pa.ChunkedArray:
    """The file's ids as strings, row group by row group. A row group whose ids cannot be decoded
    is an error naming it, or with ``skip_bad_files`` null ids (the reader then rejects its rows)."""
    fs, path = storage.filesystem(url)
    chunks = []
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        for group in range(parquet.num_row_groups):
            try:
                column = parquet.read_row_group(group, columns=[id_column]).column(0)
                chunks.append(pc.cast(column, pa.string()))
            except DECODE_ERRORS as exc:
                if not skip_bad_files:
                    raise InputError(
                        f"{url}: row group {group} cannot be read ({exc}); fix or remove the file, "
                        "or pass --skip-bad-files"
                    ) from exc
                chunks.append(pa.chunked_array([pa.nulls(parquet.metadata.row_group(group).num_rows, pa.string())]))
    return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], pa.string())


def _output_ids(output: OutputFolder) -> pa.Array:
    parts = [output.path(name) for name in output.part_files()]
    if not parts:
        return pa.array([], pa.string())
    table = ds.dataset(parts, format="parquet", filesystem=output.fs).to_table(columns=["id"])
    return pc.unique(table.column("id").combine_chunks())


def _message(rows: pa.Table, i: int, first: int, in_output: bool) -> str:
    ident, source, row = (rows.column(c)[i].as_py() for c in ("id", "source", "row"))
    if in_output:
        return f"id {ident!r} at {source} row {row} is already in the output"
    return f"id {ident!r} at {source} row {row} repeats {rows.column('source')[first].as_py()} " \
           f"row {rows.column('row')[first].as_py()}"


def _with_duplicates(unit: WorkUnit, duplicates: dict[int, str]) -> WorkUnit:
    mine = tuple((r, m) for r, m in sorted(duplicates.items()) if unit.row_start <= r < unit.row_end)
    return unit if not mine else dataclasses.replace(unit, duplicate_rows=mine)
