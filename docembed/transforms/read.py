"""Read: a WorkUnit's rows from its Parquet file, split into rows to embed and recorded rejections.

Consumes ``WorkUnit``; produces ``UnitRows`` whose table has ``id`` (string), the text column
(string) and the pass-through columns (cast to the types unified across files at planning), in file
order, plus a ``_row`` column with each row's index in its file. Id and text columns are read by
value: dictionary-encoded ones (a pandas ``category`` column) and string views give the same rows,
vectors and text digest as plain strings. Rows that cannot be embedded go to the rejections table
with a reason (see ``docembed.transforms.rejects``) instead of being dropped; rows whose id repeats
an earlier one are those the run's duplicate-id job found (``dedup``; ``duplicate_id``).
"""

from __future__ import annotations

import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from docembed.transforms import metrics, rejects

from docembed.store import storage
from docembed.store.units import UnitStore
from docembed.transforms.dedup import DECODE_ERRORS
from docembed.transforms.digest import footer_digest, texts_digest
from docembed.errors import InputError
from docembed.records import EmbedSettings, UnitRows, WorkUnit

ROW = "_row"


def read_unit(unit: WorkUnit, settings: EmbedSettings, duplicates: dict[int, str] | None = None,
              only: set[int] | None = None) -> tuple[pa.Table, pa.Table, str]:
    """(rows to embed, rejections, the digest of the unit's texts) for ``unit``; columns as in the
    module docstring. ``duplicates``: {row: message} of the unit's rows whose id repeats an earlier
    one; ``only``: read these rows of the unit and no others (a retry of its rejections)."""
    fs, path = storage.filesystem(settings.locate(unit.source))
    if not storage.same_input(unit.file_fingerprint, identity(fs, path)):
        raise InputError(f"{unit.source} changed after it was planned; rerun to plan it again")
    wanted = range(unit.row_start, unit.row_end) if only is None else sorted(only)
    columns = [settings.id_column, settings.text_column, *settings.passthrough_columns]
    try:
        table = read_rows(fs, path, unit, columns)
    except DECODE_ERRORS as exc:
        if not settings.skip_bad_files:
            raise InputError(f"{unit.source}: rows {unit.row_start}-{unit.row_end} cannot be read: {exc}") from exc
        reasons = ["unreadable_file"] * len(wanted)
        return None, rejects.rejections(pa.nulls(len(wanted), pa.string()), pa.array(wanted, pa.int64()), unit.source,
                                        reasons, [f"cannot read these rows: {exc}"] * len(wanted)), ""
    table = decode_columns(table, [settings.id_column, settings.text_column])
    text_digest = texts_digest(table.column(settings.text_column))
    if only is not None:
        table = table.filter(pc.is_in(table.column(ROW), pa.array(wanted, pa.int64())))
    return *split_rejections(table, unit, settings, duplicates or {}), text_digest


def identity(fs, path: str) -> str:
    """The file's ``storage.input_identity`` now."""
    info = fs.info(path)
    with fs.open(path, "rb") as handle:
        return storage.input_identity(info, footer_digest(handle))


def read_rows(fs, path: str, unit: WorkUnit, columns: list[str]) -> pa.Table:
    """The unit's row range of ``columns`` (each once), reading only its row groups, plus ``_row``."""
    columns = list(dict.fromkeys(columns))
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(unit.row_groups[0]))
        table = parquet.read_row_groups(list(unit.row_groups), columns=columns)
    table = table.slice(unit.row_start - first_row, unit.rows).combine_chunks()
    return table.append_column(ROW, pa.array(range(unit.row_start, unit.row_end), pa.int64()))


def decode_columns(table: pa.Table, names: list[str]) -> pa.Table:
    """``table`` with the dictionary-encoded columns among ``names`` decoded to their values."""
    for name in dict.fromkeys(names):
        column = table.column(name)
        if pa.types.is_dictionary(column.type):
            table = table.set_column(table.schema.get_field_index(name), name, plain(column))
    return table


def plain(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A dictionary-encoded column as its values (any other as it is): Parquet's dictionary encoding
    is how a file stores the column, not what its rows are."""
    return pc.cast(column, column.type.value_type) if pa.types.is_dictionary(column.type) else column


def split_rejections(table: pa.Table, unit: WorkUnit, settings: EmbedSettings,
                     duplicates: dict[int, str]) -> tuple[pa.Table, pa.Table]:
    ids = pc.cast(table.column(settings.id_column).combine_chunks(), pa.string())
    texts, bad_utf8 = _as_text(table.column(settings.text_column).combine_chunks())
    duplicate = pc.is_in(table.column(ROW), pa.array(list(duplicates), pa.int64()))
    reasons = pc.case_when(
        pa.StructArray.from_arrays(
            [pc.is_null(ids), bad_utf8, pc.fill_null(pc.equal(pc.utf8_trim_whitespace(texts), ""), True),
             duplicate.combine_chunks()],
            ["null_id", "invalid_utf8", "empty_text", "duplicate_id"],
        ),
        "null_id", "invalid_utf8", "empty_text", "duplicate_id",
    )
    rejected = pc.is_valid(reasons)
    rows = pa.table(_columns(table, ids, texts, settings))
    dropped = rows.filter(rejected)
    reason_list = reasons.filter(rejected).to_pylist()
    messages = [duplicates[row] if reason == "duplicate_id" else rejects.MESSAGES[reason]
                for reason, row in zip(reason_list, dropped.column(ROW).to_pylist())]
    return (rows.filter(pc.invert(rejected)),
            rejects.rejections(dropped.column("id"), dropped.column(ROW), unit.source, reason_list, messages))


def _columns(table: pa.Table, ids, texts, settings: EmbedSettings) -> dict:
    columns = {"id": ids, settings.text_column: texts}
    schema = settings.passthrough_schema
    for name in settings.passthrough_columns:
        if name not in columns:
            column = table.column(name)
            columns[name] = column.cast(schema.field(name).type) if schema is not None else column
    columns[ROW] = table.column(ROW)
    return columns


def no_rows(settings: EmbedSettings) -> pa.Table:
    """A rows table with no row, with the columns and types ``split_rejections`` gives (the unit's
    empty part is written from it, so it must carry the pass-through columns' planned types)."""
    schema, empty = settings.passthrough_schema, pa.array([], pa.string())
    raw = {name: pa.array([], schema.field(name).type if schema is not None else pa.null())
           for name in settings.passthrough_columns}
    return pa.table(_columns(pa.table({**raw, ROW: pa.array([], pa.int64())}), empty, empty, settings))


def _as_text(column: pa.Array) -> tuple[pa.Array, pa.Array]:
    """The column (decoded, ``decode_columns``) as strings, and a mask of values that were bytes but
    not valid UTF-8."""
    if any(test(column.type) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)):
        return pc.cast(column, pa.string()), pa.array(np.zeros(len(column), dtype=bool))
    values, bad = [], []
    for raw in column.to_pylist():  # binary columns only: each value decoded on its own
        try:
            values.append(None if raw is None else raw.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            values.append(None)
            bad.append(True)
    return pa.array(values, pa.string()), pa.array(bad, pa.bool_())


class ReadUnit(beam.DoFn):
    """WorkUnit -> UnitRows (with its rejections; the rows whose id repeats an earlier one are those
    the run's duplicate-id job wrote to the plan, ``dedup``). A unit whose commit is already complete
    is skipped: a runner may run this task again after the unit was committed (a lost worker's
    finished task re-run), and the unit must not be done twice. Only this run can have committed a
    unit of its plan, since it holds the output's lock, so the skip decides nothing about the output."""

    def __init__(self, settings: EmbedSettings):
        self._settings = settings
        self._output = UnitStore(settings.output)

    def process(self, unit: WorkUnit):
        retry, only = None, None
        if unit.retry:  # a done unit whose rejections for these reasons are tried again
            marker, kept, only = self._output.rejections_to_retry(unit.unit_id, unit.retry)
            # Nothing to retry, or this run's retry of the unit is committed already (a task run again).
            if not only or (marker or {}).get("rejects") != unit.retry_rejects:
                return
            retry = {"marker": marker, "kept": kept}
        elif self._output.is_done(unit.unit_id):
            metrics.UNITS_SKIPPED.inc()
            return
        if self._output.stop_requested():  # the run was told to stop: leave this unit for the rerun
            metrics.UNITS_LEFT.inc()
            return
        started_at, start = time.time(), time.perf_counter()
        repeated = self._output.read_repeats(self._settings.run_id, unit.unit_id)
        rows, rejected, text_digest = read_unit(unit, self._settings, repeated, only)
        seconds = {"read": time.perf_counter() - start}
        metrics.DOCS_READ.inc(unit.rows if only is None else len(only))
        if rows is None:  # the whole unit was unreadable and --skip-bad-files is on
            rows = no_rows(self._settings)
        yield UnitRows(unit, rows, rejected, seconds, started_at, retry, text_digest)
