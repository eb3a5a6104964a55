"""Plan: expand the input into Parquet files, check their schemas, and cut row-group-aligned work units.

Runs on the driver, before any work: an input that matches nothing, a missing column or an unreadable
footer is an error here, naming the file, not a failure halfway through a job.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from docembed.store import storage
from docembed.transforms.digest import footer_digest
from docembed.errors import InputError, OutputError
from docembed.records import WorkUnit
from docembed.text import plural

_GLOB_CHARS = "*?["
# A row group up to this many times --checkpoint-every stays whole; a larger one is split by rows.
_SPLIT_FACTOR = 1.5


@dataclasses.dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    fingerprint: str
    rows: int
    row_groups: tuple[int, ...]  # rows per row group
    schema: pa.Schema | None = None
    text_bytes: tuple[int, ...] = ()  # uncompressed size of the text column per row group (for ETAs)

    def to_json(self) -> dict:
        return {"url": storage.redact(self.url), "size": self.size, "fingerprint": self.fingerprint, "rows": self.rows}


@dataclasses.dataclass(frozen=True)
class Plan:
    files: tuple[InputFile, ...]
    units: tuple[WorkUnit, ...]
    skipped: tuple[dict, ...] = ()  # {"url", "error"} of unreadable files left out (--skip-bad-files)
    passthrough_schema: pa.Schema | None = None
    rows_per_unit: int = 0  # --checkpoint-every: the cut of files the output does not hold yet

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def sources(self) -> set[str]:
        """The input files as units, markers and the manifest name them (``storage.redact``)."""
        return {storage.redact(f.url) for f in self.files}

    @property
    def locations(self) -> dict[str, str]:
        """Recorded name -> the URL to read, for the input files whose URL carries credentials."""
        return {storage.redact(f.url): f.url for f in self.files if storage.redact(f.url) != f.url}


class BadFile(InputError):
    """A file that is not Parquet, or whose footer is truncated or corrupt. Its message ends with what
    to do (fix or remove it, or pass --skip-bad-files); ``reason``, what a run that skips the file (it
    passed --skip-bad-files) records and prints, does not."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}; fix or remove it, or pass --skip-bad-files")
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.reason,)


def plan_input(url: str, columns: dict[str, str], rows_per_unit: int, skip_bad_files: bool = False) -> Plan:
    """The files behind ``url`` and their work units. ``columns`` maps role -> column name (the
    roles ``id`` and ``text``; any other role is a pass-through column)."""
    urls = expand_input(url)
    # Footers are small reads with high latency on object stores: fetch them concurrently.
    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        inspected = list(pool.map(lambda u: _inspect_or_skip(u, columns, skip_bad_files), urls))
    files = [f for f, _ in inspected if f is not None]
    skipped = tuple({"url": storage.redact(u), "error": storage.redact_text(e.reason)}
                    for u, (f, e) in zip(urls, inspected) if f is None)
    passthrough = [name for role, name in columns.items() if role not in ("id", "text")]
    schema = unify_passthrough([(f.url, f.schema) for f in files], passthrough)
    units = [u for f in files for u in units_for_file(f, rows_per_unit)]
    return Plan(tuple(files), tuple(units), skipped, schema, rows_per_unit)


def _inspect_or_skip(url: str, columns: dict[str, str], skip_bad_files: bool):
    try:
        return _inspect(url, columns), None
    except BadFile as exc:
        if not skip_bad_files:
            raise
        return None, exc


def expand_input(url: str) -> list[str]:
    """File URLs for a file, a folder (recursively) or a glob. Names starting with ``_`` or ``.``
    (Spark's ``_SUCCESS``, checksum and temporary files) are skipped, as Parquet readers do."""
    fs, path = storage.filesystem(url)
    if any(c in path for c in _GLOB_CHARS):
        paths = [p for p in fs.glob(path) if fs.isfile(p) and not _hidden(posixpath.basename(p))]
    elif fs.isdir(path):
        paths = [p for p in fs.find(path) if not _hidden(posixpath.relpath(p, path))]
    elif fs.exists(path):
        paths = [path]
    else:
        raise InputError(f"--input {url}: no such file or folder")
    if not paths:
        raise InputError(f"--input {url} matched no files")
    return [storage.full_url(fs, p) for p in sorted(paths)]


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/"))


def _inspect(url: str, columns: dict[str, str]) -> InputFile:
    fs, path = storage.filesystem(url)
    try:
        info = fs.info(path)
    except OSError as exc:  # removed or unreadable since it was listed
        raise InputError(f"{url} cannot be read: {exc}") from exc
    try:
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
            schema = metadata.schema.to_arrow_schema()
            footer = footer_digest(handle)
    except (pa.ArrowException, OSError) as exc:
        raise BadFile(f"{url} is not a readable Parquet file ({exc})") from exc
    check_schema(url, schema, columns)
    groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    leaves = [metadata.schema.column(k).path for k in range(metadata.num_columns)]
    text_index = leaves.index(columns["text"]) if columns["text"] in leaves else None
    text_bytes = () if text_index is None else tuple(
        metadata.row_group(i).column(text_index).total_uncompressed_size for i in range(metadata.num_row_groups))
    return InputFile(url, int(info.get("size") or 0), storage.input_identity(info, footer), metadata.num_rows,
                     groups, schema, text_bytes)


def check_schema(url: str, schema: pa.Schema, columns: dict[str, str]) -> None:
    missing = [f"{role} column {name!r}" for role, name in columns.items() if name not in schema.names]
    if missing:
        raise InputError(f"{url}: no {', '.join(missing)}; columns found: {', '.join(schema.names)}")
    text, ident = schema.field(columns["text"]), schema.field(columns["id"])
    if not (_is_text(stored_type(text.type)) or _is_binary(stored_type(text.type))):
        raise InputError(f"{url}: text column {text.name!r} has type {text.type}; it must be string or binary")
    if not (_is_text(stored_type(ident.type)) or pa.types.is_integer(stored_type(ident.type))):
        raise InputError(f"{url}: id column {ident.name!r} has type {ident.type}; it must be string or integer")


def stored_type(t: pa.DataType) -> pa.DataType:
    """The type of a column's values: a dictionary-encoded column (a pandas ``category`` written to
    Parquet) holds its dictionary's values, which the reader decodes (``read.decode_columns``)."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_text(t: pa.DataType) -> bool:
    # An all-null column (type null) is accepted: each of its rows is rejected on its own.
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            or pa.types.is_null(t))


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def unify_passthrough(schemas: list[tuple[str, pa.Schema]], names: list[str]) -> pa.Schema | None:
    """One type per pass-through column across all files (int32 and int64 give int64, a null
    column takes the others' type); a column whose types cannot be unified is an error naming a file."""
    if not names or not schemas:
        return None
    unified = pa.schema([schemas[0][1].field(n) for n in names])
    for url, schema in schemas[1:]:
        fields = pa.schema([schema.field(n) for n in names])
        try:
            unified = pa.unify_schemas([unified, fields], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(
                f"{url}: pass-through columns {fields} do not match the other files' ({unified}): {exc}"
            ) from exc
    return unified


def plan_ranges(row_groups: tuple[int, ...], rows_per_unit: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """Cut a file into (row_start, row_end, row_groups) ranges of about ``rows_per_unit`` rows.

    Whole row groups are gathered until a unit reaches ``rows_per_unit``, so a unit reads only its
    own row groups. A row group larger than 1.5x the target is split into equal row ranges.
    """
    ranges, start, groups = [], 0, []
    offset = 0
    for index, rows in enumerate(row_groups):
        if rows > _SPLIT_FACTOR * rows_per_unit:
            if groups:
                ranges.append((start, offset, tuple(groups)))
            pieces = math.ceil(rows / rows_per_unit)
            bounds = [offset + rows * k // pieces for k in range(pieces + 1)]
            ranges += [(a, b, (index,)) for a, b in zip(bounds, bounds[1:])]
            offset += rows
            start, groups = offset, []
            continue
        groups.append(index)
        offset += rows
        if offset - start >= rows_per_unit:
            ranges.append((start, offset, tuple(groups)))
            start, groups = offset, []
    if offset > start:
        ranges.append((start, offset, tuple(groups)))
    return ranges


def units_for_file(file: InputFile, rows_per_unit: int) -> list[WorkUnit]:
    return [
        WorkUnit(storage.redact(file.url), file.fingerprint, a, b, groups,
                 text_bytes=_unit_text_bytes(file, a, b, groups), cut=rows_per_unit)
        for a, b, groups in plan_ranges(file.row_groups, rows_per_unit)
    ]


def align(plan: Plan, markers: dict[str, dict], earlier_cut: int | None = None) -> Plan:
    """The plan as the output already holds its files: a file with committed units keeps the cut
    they were made with, so that --checkpoint-every may change between runs and apply to files never
    embedded (``_cut_of``); and a file whose committed units recorded its identity as earlier versions
    did keeps that record while the file still matches it (``storage.same_input``)."""
    by_source: dict[str, list[dict]] = {}
    for marker in markers.values():
        by_source.setdefault(marker["source"], []).append(marker)
    files, units = [], []
    for file in plan.files:
        mine = [m for m in by_source.get(storage.redact(file.url), [])
                if storage.same_input(m["file_fingerprint"], file.fingerprint)]
        if mine and mine[0]["file_fingerprint"] != file.fingerprint:
            file = dataclasses.replace(file, fingerprint=mine[0]["file_fingerprint"])
        files.append(file)
        units += units_for_file(file, _cut_of(file, mine, plan.rows_per_unit, earlier_cut))
    return dataclasses.replace(plan, files=tuple(files), units=tuple(units))


def _cut_of(file: InputFile, mine: list[dict], rows_per_unit: int, earlier_cut: int | None) -> int:
    """The cut that gives back every committed range of ``file``: this run's if it does, else the one
    its markers record (``cut``), the output's manifest's (``earlier_cut``: markers written before
    the cut was recorded), or a committed unit's own size; none that does: this run's (``split_done``
    then names the conflict)."""
    committed = {(m["row_start"], m["row_end"]) for m in mine}
    candidates = [rows_per_unit, *(m.get("cut") for m in mine), earlier_cut, *(b - a for a, b in committed)]
    for cut in dict.fromkeys(c for c in candidates if c):
        if committed <= {(a, b) for a, b, _ in plan_ranges(file.row_groups, cut)}:
            return cut
    return rows_per_unit


def _unit_text_bytes(file: InputFile, start: int, end: int, groups: tuple[int, ...]) -> int:
    """The unit's share of its row groups' text bytes: a characters estimate known before reading,
    so ETAs can follow text remaining rather than documents remaining."""
    if not file.text_bytes:
        return 0
    offsets = [0]
    for rows in file.row_groups:
        offsets.append(offsets[-1] + rows)
    total = 0.0
    for g in groups:
        a, b = max(start, offsets[g]), min(end, offsets[g + 1])
        if b > a and file.row_groups[g]:
            total += file.text_bytes[g] * (b - a) / file.row_groups[g]
    return int(total)


def split_done(plan: Plan, markers: dict[str, dict]) -> tuple[list[WorkUnit], list[WorkUnit], list[dict]]:
    """(units to do, units already done, markers superseded).

    A committed unit whose file is still in the input but has changed since (``storage.input_identity``:
    another etag, size, modification or change time, or footer) is superseded: its rows are to be
    replaced by the file's new units. A resume that would embed a row twice is refused: unit
    boundaries that moved where ``align`` could not tell the cut the units were made with.
    """
    fingerprints = {storage.redact(f.url): f.fingerprint for f in plan.files}
    superseded = [m for m in markers.values()
                  if fingerprints.get(m["source"], m["file_fingerprint"]) != m["file_fingerprint"]]
    gone = {m["unit_id"] for m in superseded}
    done_ranges: dict[str, list[tuple[int, int]]] = {}
    for marker in markers.values():
        if marker["unit_id"] not in gone:
            done_ranges.setdefault(marker["source"], []).append((marker["row_start"], marker["row_end"]))
    todo, done = [], []
    for unit in plan.units:
        if unit.unit_id in markers:
            done.append(unit)
            continue
        for a, b in done_ranges.get(unit.source, []):
            if a < unit.row_end and unit.row_start < b:
                raise OutputError(
                    f"{unit.source}: rows {a}-{b} were committed as one unit, but this run plans rows "
                    f"{unit.row_start}-{unit.row_end}, and its markers do not record the --checkpoint-every "
                    "they were cut with; resume with the --checkpoint-every of the run that embedded it, "
                    "or use --overwrite"
                )
        todo.append(unit)
    return todo, done, superseded


def outside_plan(markers: dict[str, dict], sources: set[str]) -> list[dict]:
    """Committed units whose file is not an input of this plan, by file: whether the file is gone
    (deleted since it was embedded) or only outside ``--input``, with its units and rows."""
    groups: dict[str, list[dict]] = {}
    for marker in markers.values():
        if marker["source"] not in sources:
            groups.setdefault(marker["source"], []).append(marker)
    found = []
    for source, mine in sorted(groups.items()):
        fs, path = storage.filesystem(source)
        found.append({"source": source, "gone": not fs.exists(path), "units": len(mine),
                      "rows": sum(m["row_end"] - m["row_start"] for m in mine), "unit_ids": [m["unit_id"] for m in mine]})
    return found


def describe_outside(group: dict) -> str:
    where = "is gone since it was embedded" if group["gone"] else "is not in --input"
    return f"{group['source']} {where}: its {plural(group['units'], 'unit')} ({plural(group['rows'], 'row')})"
