"""Commit: publish a unit's Parquet part (and its rejections), then its done-marker.

Consumes ``UnitEmbeddings``; produces the unit's done-marker record, which holds the unit's counts
(``embedded + rejected`` is always the unit's row count), the numerics of the worker that made its
vectors (device, precision, host, library versions) and the unit's quality statistics. Before
anything is published, the worker's numerics and canary vectors are checked against the output's
(``UnitStore.check_numerics``, ``UnitStore.check_canaries``). The part is published under a
name derived from the unit id, atomically (see ``storage.publish``), so a retried bundle or a rerun
overwrites it with identical rows instead of adding a copy. The marker is written last: a unit
killed before it is redone in full and nothing of it is counted.

A unit that embeds no document (every row rejected) still publishes its part, with no rows and the
output's full schema, so that readers (pandas, DuckDB, Spark) of an output whose every row was
rejected see its columns rather than no file at all. An input with no rows at all plans no unit, so
nothing is published and such an output holds no part (readers see no columns).
"""

from __future__ import annotations

import collections
import io
import os
import json
import time

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from docembed.transforms import metrics

from docembed.quality import stats as quality

from docembed import vectors
from docembed.store.layout import CHUNK_COLUMNS, FINGERPRINT_KEY, NUMERICS_KEY, UNIT_KEY, rejects_name
from docembed.store.units import UnitStore
from docembed.errors import CommitError
from docembed.records import EmbedSettings, UnitEmbeddings



def output_table(done: UnitEmbeddings, settings: EmbedSettings, ranges=None) -> pa.Table:
    """``id``, ``embedding`` (fixed-size list in ``--output-dtype``; ``ranges``: the output's int8/uint8
    calibration) and the pass-through columns, in row order,
    with the fingerprint and the unit in the Parquet metadata. With ``--long-docs chunks``, one row
    per window: ``id``, ``chunk``, ``char_start``, ``char_end``, ``embedding`` (and ``chunk_text``)."""
    rows = done.table.select(["id", *settings.passthrough_columns])  # never repeat the texts per window
    columns = {"id": None}
    if done.chunks is not None:
        rows = rows.take(done.chunks.column("row"))
        columns.update({name: done.chunks.column(name) for name in CHUNK_COLUMNS})
    columns["id"] = rows.column("id")
    columns["embedding"] = embedding_column(done, settings, ranges)
    if done.chunks is not None and settings.chunk_text:
        columns["chunk_text"] = window_texts(done.table.column(settings.text_column), done.chunks)
    for name in settings.passthrough_columns:
        columns[name] = rows.column(name)
    table = pa.table(columns)
    return table.replace_schema_metadata(
        {FINGERPRINT_KEY: json.dumps(settings.fingerprint(), sort_keys=True),
         UNIT_KEY: json.dumps(done.unit.to_json(), sort_keys=True),
         NUMERICS_KEY: json.dumps(done.numerics, sort_keys=True)}
    )


def embedding_column(done: UnitEmbeddings, settings: EmbedSettings, ranges=None) -> pa.Array:
    """The unit's vectors in ``--output-dtype``; with none, an empty column of the same type (no
    calibration needed)."""
    if not len(done.embeddings):
        return pa.array([], vectors.arrow_type(settings.output_dtype, settings.dim))
    return vectors.column(done.embeddings, settings.output_dtype, settings.dim, ranges)


def calibration_of(done: UnitEmbeddings, settings: EmbedSettings, output: UnitStore):
    """The output's int8/uint8 calibration (pinned by its first commit) where the dtype needs one; a
    unit without vectors needs none, and must not pin one from nothing."""
    if settings.output_dtype in vectors.CALIBRATED and len(done.embeddings):
        return output.quantization_ranges(settings.output_dtype, done.embeddings)
    return None


def window_texts(texts: pa.ChunkedArray, chunks: pa.Table) -> pa.Array:
    """``text[char_start:char_end]`` of each window (offsets count code points, as Python slices)."""
    texts = texts.to_pylist()
    windows = zip(*(chunks.column(c).to_pylist() for c in ("row", "char_start", "char_end")))
    return pa.array([texts[r][a:b] for r, a, b in windows], pa.large_string())


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def commit_unit(done: UnitEmbeddings, settings: EmbedSettings, output: UnitStore) -> dict:
    started = time.perf_counter()
    unit_id = done.unit.unit_id
    checked = check_worker(done, settings, output)
    # Published even with no rows (every row rejected): the output's schema must be readable.
    data = parquet_bytes(output_table(done, settings, calibration_of(done, settings, output)))
    part, part_bytes = output.write_part(unit_id, data), len(data)
    rejects = rejects_name(unit_id)
    if done.rejects.num_rows:
        output.publish(rejects, parquet_bytes(done.rejects))
    else:
        output.remove(rejects)
        rejects = None
    check_lock(output, settings)
    record = {
        **done.unit.to_json(),
        "part": part,
        "part_bytes": part_bytes,  # so that a resume can tell its part from another file of that name
        "rejects": rejects,
        "embedded": done.table.num_rows,
        "rejected": done.rejects.num_rows,
        "rejected_by_reason": dict(collections.Counter(done.rejects.column("reason").to_pylist())),
        "rows": output_rows(done),
        "windows": done.windows,
        "truncated": done.truncated,
        "tokens": done.tokens,
        "text_tokens": done.text_tokens,
        "dropped_tokens": done.dropped_tokens,
        "count_dropped": settings.count_dropped,  # exact, or estimated from characters
        "padded_tokens": done.padded_tokens,
        "batches": done.batches,
        "run_id": settings.run_id,
        "committed_at": time.time(),
        # The marker's own write is the only part of the commit not counted here.
        "seconds": {**done.seconds, "write": time.perf_counter() - started},
        "started_at": done.started_at,
        "batch_stats": done.batch_stats,
        "worker": worker_stats(),
        "numerics": done.numerics,
        "canaries": checked,
        "quality": done.quality,
        "text_digest": done.text_digest,  # what verify --input compares the input's texts with
    }
    output.mark_done(unit_id, record)
    return record


def check_worker(done: UnitEmbeddings, settings: EmbedSettings, output: UnitStore) -> dict:
    """The worker's numerics and canaries against the output's (pinning them on its first commit);
    returns the canary check for the marker."""
    output.check_numerics(done.numerics)
    if done.canaries is None:  # embedded by a caller that probed no canaries (tests of the commit alone)
        return {"checked": 0}
    return output.check_canaries(done.canaries, settings.canary_threshold)


# Marker counts a retry of rejections adds its own to.
ADDED_COUNTS = ("windows", "truncated", "tokens", "text_tokens", "dropped_tokens", "padded_tokens", "batches")


def commit_retry(done: UnitEmbeddings, settings: EmbedSettings, output: UnitStore) -> dict:
    """A retry of a done unit's rejections (``--retry-rejects``): the rows embedded now go to a part of
    their own (``part-<unit>-retry-<k>``), so no row is ever in two parts; the rejections still
    standing (those not retried, and those that failed again) to a new rejections file; then the
    marker, rewritten to name both, with its counts moved; the old rejections file goes last. A
    crash before the marker leaves files no marker names, which the next run removes; the retried
    rows are then still rejections, and are retried again."""
    old, unit_id = done.retry["marker"], done.unit.unit_id
    checked = check_worker(done, settings, output)
    retry = len(old.get("retry_parts", [])) + 1
    parts = list(old.get("retry_parts", []))
    if done.table.num_rows:
        data = parquet_bytes(output_table(done, settings, calibration_of(done, settings, output)))
        parts.append({"name": output.write_part(unit_id, data, retry), "bytes": len(data)})
    standing = pa.concat_tables([done.retry["kept"], done.rejects]).sort_by("row_index")
    rejects = rejects_name(unit_id, retry) if standing.num_rows else None
    if rejects:
        output.publish(rejects, parquet_bytes(standing))
    check_lock(output, settings)
    old_embedded = old.get("embedded", 0)
    record = {
        **old,
        **{k: old.get(k, old_embedded if k == "windows" else 0) + getattr(done, k) for k in ADDED_COUNTS},
        "retry_parts": parts,
        "quality": quality.merge([old.get("quality"), done.quality]),
        "rejects": rejects,
        "embedded": old_embedded + done.table.num_rows,
        "rejected": standing.num_rows,
        "rejected_by_reason": dict(collections.Counter(standing.column("reason").to_pylist())),
        "rows": old.get("rows", old_embedded) + output_rows(done),
        "retries": [*old.get("retries", []), {"run_id": settings.run_id, "committed_at": time.time(),
                                             "tried": done.table.num_rows + done.rejects.num_rows,
                                             "embedded": done.table.num_rows, "numerics": done.numerics,
                                             "canaries": checked}],
    }
    output.mark_done(unit_id, record)
    if old.get("rejects") and old["rejects"] != rejects:
        output.remove(old["rejects"])
    return record


def output_rows(done: UnitEmbeddings) -> int:
    """Rows the unit's part holds: its documents, or with ``--long-docs chunks`` their windows."""
    return done.chunks.num_rows if done.chunks is not None else done.table.num_rows


def check_lock(output: UnitStore, settings: EmbedSettings) -> None:
    """Before the marker: refuse to commit if another run has taken the output's lock since this run
    took it (two writers could otherwise remove each other's unmarked parts)."""
    if not settings.lock_token:
        return
    held = output.read_lock()
    if not held or held.get("token") != settings.lock_token:
        raise CommitError(f"this run no longer holds {output.url}'s lock (held by {held}); stopping before "
                          "committing more: check the output with `python -m docembed verify`")


def worker_stats() -> dict:
    """Who committed the unit, that process's peak memory so far (merged into the run report), and
    where the process uses CUDA the device's peak since the unit began (``embed.reset_device_peak``)."""
    import resource
    import socket
    import sys

    stats = {"host": socket.gethostname(), "pid": os.getpid(),
             "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    torch = sys.modules.get("torch")
    # is_initialized is a flag of torch's own, where is_available asks the driver: a CPU run's process
    # never calls into CUDA, and one that never used CUDA has no peak to report.
    if torch is not None and torch.cuda.is_initialized():
        stats["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return stats


def commit_or_fail(done: UnitEmbeddings, settings: EmbedSettings, output: UnitStore, commit=None) -> dict:
    try:
        return (commit or commit_unit)(done, settings, output)
    except OSError as exc:  # nothing partial is visible: publish is whole-or-nothing, the marker last
        raise CommitError(f"unit {done.unit.unit_id}: writing to {output.url} failed: {exc}") from exc


class CommitUnit(beam.DoFn):
    """UnitEmbeddings -> done-marker record."""

    def __init__(self, settings: EmbedSettings):
        self._settings = settings
        self._output = UnitStore(settings.output)

    def process(self, done: UnitEmbeddings):
        commit = commit_retry if done.retry else commit_unit
        record = commit_or_fail(done, self._settings, self._output, commit)
        metrics.DOCS_EMBEDDED.inc(done.table.num_rows)
        metrics.DOCS_REJECTED.inc(done.rejects.num_rows)
        (metrics.REJECTS_RETRIED if done.retry else metrics.UNITS_COMMITTED).inc()
        yield record
