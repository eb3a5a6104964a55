"""Read: a WorkUnit's rows from its Parquet file, split into rows to embed and recorded rejections.

Consumes ``WorkUnit``; produces ``UnitRows`` whose table has ``id`` (string), the text column
(string) and the pass-through columns, in file order, plus a ``_row`` column with each row's index
in its file. Rows that cannot be embedded (null id, empty text, undecodable bytes) go to the
rejections table with a reason instead of being dropped.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transforms import metrics, storage
from transforms.checkpoint import OutputFolder
from transforms.errors import InputError
from transforms.records import EmbedSettings, UnitRows, WorkUnit

ROW = "_row"
REJECT_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("row_index", pa.int64()),
     ("reason", pa.string()), ("message", pa.string())]
)


def read_unit(unit: WorkUnit, settings: EmbedSettings) -> tuple[pa.Table, pa.Table]:
    """(rows to embed, rejections) for ``unit``; columns as in the module docstring."""
    columns = [settings.id_column, settings.text_column, *settings.passthrough_columns]
    fs, path = storage.filesystem(unit.source)
    info = fs.info(path)
    if storage.file_fingerprint(info) != unit.file_fingerprint:
        raise InputError(f"{unit.source} changed after it was planned; rerun to plan it again")
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(unit.row_groups[0]))
        table = parquet.read_row_groups(list(unit.row_groups), columns=list(dict.fromkeys(columns)))
    table = table.slice(unit.row_start - first_row, unit.rows)
    table = table.append_column(ROW, pa.array(range(unit.row_start, unit.row_end), pa.int64()))
    return _split_rejections(table, unit.source, settings)


def _split_rejections(table: pa.Table, source: str, settings: EmbedSettings) -> tuple[pa.Table, pa.Table]:
    table = table.combine_chunks()
    ids = pc.cast(table.column(settings.id_column).combine_chunks(), pa.string())
    texts, bad_utf8 = _as_text(table.column(settings.text_column).combine_chunks())
    null_id = pc.is_null(ids)
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(texts), ""), True)
    reasons = pc.case_when(
        pa.StructArray.from_arrays([null_id, bad_utf8, empty], ["a", "b", "c"]),
        "null_id", "invalid_utf8", "empty_text",
    )
    rejected = pc.is_valid(reasons)
    columns = {"id": ids, settings.text_column: texts}
    for name in settings.passthrough_columns:
        columns.setdefault(name, table.column(name))
    columns[ROW] = table.column(ROW)
    rows = pa.table(columns)
    keep = rows.filter(pc.invert(rejected))
    rejects = _rejections(rows.filter(rejected), reasons.filter(rejected), source)
    return keep, rejects


def _as_text(column: pa.Array) -> tuple[pa.Array, pa.Array]:
    """The column as strings, and a mask of values that were bytes but not valid UTF-8."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pc.cast(column, pa.string()), pa.array(np.zeros(len(column), dtype=bool))
    values, bad = [], []
    for raw in column.to_pylist():
        try:
            values.append(None if raw is None else raw.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            values.append(None)
            bad.append(True)
    return pa.array(values, pa.string()), pa.array(bad, pa.bool_())


_MESSAGES = {
    "null_id": "the id is null",
    "invalid_utf8": "the text is bytes that are not valid UTF-8",
    "empty_text": "the text is null, empty or only whitespace",
}


def _rejections(rows: pa.Table, reasons: pa.Array, source: str) -> pa.Table:
    reason_list = reasons.to_pylist()
    return pa.table(
        {
            "id": rows.column("id"),
            "source": pa.array([source] * rows.num_rows, pa.string()),
            "row_index": rows.column(ROW),
            "reason": pa.array(reason_list, pa.string()),
            "message": pa.array([_MESSAGES[r] for r in reason_list], pa.string()),
        },
        schema=REJECT_SCHEMA,
    )


class ReadUnit(beam.DoFn):
    """WorkUnit -> UnitRows (with its rejections). Units already done are skipped here, so a
    retried bundle or a second runner of the same unit does no work twice."""

    def __init__(self, settings: EmbedSettings):
        self._settings = settings
        self._output = OutputFolder(settings.output)

    def process(self, unit: WorkUnit):
        if self._output.is_done(unit.unit_id):
            metrics.UNITS_SKIPPED.inc()
            return
        rows, rejects = read_unit(unit, self._settings)
        metrics.DOCS_READ.inc(unit.rows)
        yield UnitRows(unit, rows, rejects)
