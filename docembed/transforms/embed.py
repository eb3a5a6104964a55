"""Embed: turn a unit's texts into float32 vectors, one model per worker process.

Consumes ``UnitRows``; produces ``UnitEmbeddings`` (vectors in the unit's row order; one per window
with ``--long-docs chunks``). In ``setup`` each worker process resolves the device and precision
against its own hardware (``numerics``), finds the model's files from the settings' reference
(``model_ref``), loads it once through Beam's ``shared.Shared`` (so DoFn instances, bundles and
retries in one process reuse it) and checks it against the launcher's description. Then it embeds
the canary texts (``canaries``): where the output has canaries pinned, a worker whose vectors of them
differ fails here, before any work. ``embed_unit`` picks the ``--long-docs`` mode; the batching and
the model loop are ``inference``; each unit's quality statistics (``quality``) travel with its
vectors to its done-marker. Documents the model fails on alone are rejected here (``model_error``)
with the error.

A unit's model loop does nothing but embed: a watcher thread per unit (``UnitWatch``) reads the
store for a stop request and writes the unit's progress, so no store round trip leaves the device
idle between batches. Each unit starts the device's peak-memory count afresh (``reset_device_peak``),
so the peak its marker reports is the unit's own, not the model load's.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import weakref

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.utils import shared

from docembed.model import canaries, numerics

from docembed.transforms.prepare import chunk

from docembed.transforms import metrics, rejects

from docembed.quality import stats as quality
from docembed.store.units import UnitStore
from docembed.errors import ModelError, NonFiniteVectors, UnitAbandoned
from docembed.transforms.inference import check_model_errors, device_failures, embed_rows, embed_windows
from docembed.model.card import ModelCard
from docembed.model.embedder import Embedder
from docembed.model.ref import materialize
from docembed.records import EmbedSettings, UnitEmbeddings, UnitRows

PROGRESS_EVERY_S = 5.0
STOP_CHECK_S = 1.0  # how often a worker looks for a stop request while it embeds a unit

# One model per process: DoFn instances, bundles and retries all acquire the same loaded model
# through this handle, which lives as long as someone holds it. A CUDA error that poisons the device
# (``inference.DeviceFailed``) changes the key, so that no retry in this process is handed the broken
# model; the new one works only in a new process, which Beam's runners on Dataflow give a failed item.
_MODELS = shared.Shared()
_PROBES: "weakref.WeakKeyDictionary[Embedder, dict]" = weakref.WeakKeyDictionary()


def acquire_embedder(settings: EmbedSettings, resolved: dict) -> Embedder:
    """This process's model for ``settings`` at the ``resolved`` device and precision: loaded on
    first use, and checked against the launcher's description of it."""
    key = json.dumps([dataclasses.asdict(settings.model_ref), resolved["device"], resolved["precision"],
                      settings.normalize, settings.max_seq_length, settings.prefix, settings.truncate_dim,
                      settings.trust_remote_code, device_failures()])
    return _MODELS.acquire(lambda: load_embedder(settings, resolved), tag=key)


def load_embedder(settings: EmbedSettings, resolved: dict) -> Embedder:
    embedder = Embedder(
        materialize(settings.model_ref), resolved["device"], resolved["precision"], settings.normalize,
        settings.max_seq_length, settings.prefix, settings.threads, settings.truncate_dim, settings.trust_remote_code,
    )
    described = ModelCard(settings.dim, settings.max_seq_length, settings.pooling, settings.normalize, 0)
    differences = embedder.card().differences(described)
    if differences:
        raise ModelError(f"worker {resolved['host']}: the model {settings.model} it loaded is not the one the "
                         f"launcher described ({'; '.join(differences)}); workers and launcher must run the "
                         "same docembed, libraries and model files")
    return embedder


def probe_canaries(embedder: Embedder, resolved: dict, output: UnitStore, threshold: float) -> dict:
    """This worker's canary record (the output's pinned texts, else the shipped ones). Where the output
    has canaries pinned, a worker whose vectors differ raises CanaryMismatch now, before any work; on
    a new output the first commit pins them (``UnitStore.check_canaries``)."""
    pinned = output.read_canaries()
    texts = pinned["texts"] if pinned else dict(canaries.TEXTS)
    key = json.dumps(texts, sort_keys=True)
    probes = _PROBES.setdefault(embedder, {})  # DoFn instances of one process share the model, and its probe
    found = probes.get(key) or canaries.probe(embedder, texts)
    if all(v is not None for v in found["vectors"].values()):
        # Kept only whole: a probe the model failed on (a device fault since mended, as the next run
        # into the output in this process may find) is made again, not carried into that run.
        probes[key] = found
    mine = {**found, "numerics": resolved}
    if pinned:
        canaries.check(pinned, mine, threshold)
    return mine


def with_model_errors(rows: UnitRows, failed: dict[int, str]) -> tuple[pa.Table, np.ndarray, pa.Table]:
    """(rows kept, a mask of the rows kept, rejections) with the documents the model failed on
    moved to the rejections as ``model_error``."""
    keep = np.ones(rows.table.num_rows, dtype=bool)
    if not failed:
        return rows.table, keep, rows.rejects
    bad = sorted(failed)
    keep[bad] = False
    failed_rows = rows.table.take(pa.array(bad))
    model_rejects = rejects.rejections(
        failed_rows.column("id"), failed_rows.column("_row"), rows.unit.source,
        ["model_error"] * len(bad), [failed[i] for i in bad],
    )
    return (rows.table.filter(pa.array(keep)), keep,
            pa.concat_tables([rows.rejects, model_rejects]).sort_by("row_index"))


def unit_place(rows: UnitRows) -> str:
    """The unit as errors name it."""
    unit = rows.unit
    return f"unit {unit.unit_id} ({unit.source} rows {unit.row_start}-{unit.row_end})"


def embed_unit(embedder: Embedder, rows: UnitRows, settings: EmbedSettings, on_batch=None) -> UnitEmbeddings:
    """A unit's vectors in the ``--long-docs`` mode asked for: each document's first window
    (truncate), the weighted mean of all its windows (mean), or every window as a row (chunks)."""
    texts = rows.table.column(settings.text_column).to_pylist()
    try:
        return _embed_unit(embedder, rows, texts, settings, on_batch)
    except NonFiniteVectors as exc:  # the model loop knows positions; name the documents' ids
        ids = rows.table.column("id").take(pa.array(exc.rows[:5], pa.int64())).to_pylist()
        more = f" and {len(exc.rows) - 5} more" if len(exc.rows) > 5 else ""
        raise NonFiniteVectors(f"{unit_place(rows)}: {exc} (documents {', '.join(map(str, ids))}{more})",
                               exc.rows) from exc


def _embed_unit(embedder: Embedder, rows: UnitRows, texts: list[str], settings: EmbedSettings,
                on_batch) -> UnitEmbeddings:
    chunks = None
    if settings.long_docs == "truncate":
        embedded = embed_rows(embedder, texts, settings, on_batch)
        table, keep, rejected = with_model_errors(rows, embedded.failed)
        vectors, window_count = embedded.vectors[keep], int(keep.sum())
        norms = embedded.norms[keep]
    else:
        embedded, windows = embed_windows(embedder, texts, settings, on_batch)
        table, keep, rejected = with_model_errors(rows, embedded.failed)
        window_count = int(keep[windows.doc].sum())
        norms = embedded.norms[keep[windows.doc]]
        if settings.long_docs == "mean":
            vectors = chunk.mean_by_document(embedded.vectors, windows, len(texts), embedder.normalize)[keep]
        else:
            kept = keep[windows.doc]
            vectors = embedded.vectors[kept]
            chunks = pa.table({
                "row": pa.array((np.cumsum(keep) - 1)[windows.doc[kept]], pa.int64()),
                "chunk": pa.array(windows.chunk[kept], pa.int32()),
                "char_start": pa.array(windows.char_start[kept], pa.int64()),
                "char_end": pa.array(windows.char_end[kept], pa.int64()),
            })
    unit = rows.unit
    documents = unit.rows if rows.retry else len(texts)  # the bound is a share of the unit's documents
    check_model_errors(embedded.failed, documents, settings.max_model_errors, unit_place(rows))
    seconds = {**rows.seconds, "tokenize": embedded.tokenize_s, "forward": embedded.forward_s}
    stats = [[d, t, p, round(s, 6)] for d, t, p, s in embedded.batch_stats]
    unit_quality = quality.unit_stats(embedded.doc_tokens[keep],
                                      quality.mostly_non_letters(table.column(settings.text_column)), norms, vectors)
    return UnitEmbeddings(rows.unit, table, rejected, vectors, embedded.truncated, embedded.tokens,
                          embedded.padded_tokens, embedded.batches, seconds, stats, rows.started_at, chunks,
                          window_count, embedded.text_tokens, sum(n for i, n in embedded.dropped.items() if keep[i]),
                          retry=rows.retry, quality=unit_quality, text_digest=rows.text_digest)


def reset_device_peak(embedder: Embedder) -> None:
    """Start the device's peak-memory count afresh (what ``commit.worker_stats`` reports), so that a
    unit's figure is the memory held (the weights) plus its own batches' peak, leaving out the model
    load's transient peak and earlier units. Counted per process: with two harness threads, it spans
    the other thread's batches too. The CPU path never touches CUDA."""
    if embedder.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


class UnitWatch:
    """Stop requests and progress of one unit, off the model's thread: a thread reads the stop
    deadline every ``STOP_CHECK_S`` and writes progress every ``PROGRESS_EVERY_S`` (store round trips
    that, on the model loop, would leave the device idle). ``after_batch``, on the model loop, only
    records the count and compares the clock with the deadline read, so a unit is abandoned at the
    first batch past it (--grace-period holds however long a unit is); a store error reading the stop
    request is raised there too, as a check on the model loop would have raised it."""

    def __init__(self, output: UnitStore, rows: UnitRows):
        self._output, self._rows = output, rows
        self._done = 0  # documents embedded so far: written by the model loop, read by the watcher
        self._deadline: float | None = None  # the stop request's, once the watcher has seen one
        self._error: Exception | None = None  # the store's, reading the stop request
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watch-{rows.unit.unit_id}", daemon=True)

    def __enter__(self) -> UnitWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._finished.set()
        self._thread.join()

    def after_batch(self, done: int) -> None:
        self._done = done
        if self._error is not None:
            raise self._error
        if self._deadline is not None and time.time() >= self._deadline:
            raise UnitAbandoned(self._rows.unit.unit_id)

    def _watch(self) -> None:
        last_progress = time.monotonic()
        while not self._finished.wait(STOP_CHECK_S):
            try:
                self._deadline = self._output.stop_deadline()
            except Exception as exc:  # noqa: BLE001 - raised on the model loop (after_batch)
                self._error = exc
                return
            if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                self._write_progress()

    def _write_progress(self) -> None:
        unit = self._rows.unit
        try:
            self._output.write_progress(unit.unit_id, self._done + self._rows.rejects.num_rows, unit.rows,
                                        unit.text_bytes)
        except OSError:  # progress is best-effort; the unit's work is not
            pass


class EmbedUnit(beam.DoFn):
    """UnitRows -> UnitEmbeddings."""

    def __init__(self, settings: EmbedSettings):
        self._settings = settings
        self._output = UnitStore(settings.output)

    def setup(self):
        self._numerics = numerics.resolve(self._settings.device, self._settings.precision, self._settings.trained_dtype)
        self._generation = device_failures()
        self._embedder = acquire_embedder(self._settings, self._numerics)
        self._canaries = probe_canaries(self._embedder, self._numerics, self._output, self._settings.canary_threshold)

    def process(self, rows: UnitRows):
        if self._generation != device_failures():  # the device failed since setup: never reuse that model
            self.setup()
        reset_device_peak(self._embedder)
        try:
            with UnitWatch(self._output, rows) as watch:
                done = embed_unit(self._embedder, rows, self._settings, watch.after_batch)
        except UnitAbandoned:  # told to stop, and out of grace: the rerun does this unit
            metrics.UNITS_LEFT.inc()
            return
        done.numerics, done.canaries = self._numerics, self._canaries
        for items, tokens, _, seconds in done.batch_stats:
            metrics.BATCH_LATENCY_MS.update(int(seconds * 1000))
            metrics.BATCH_DOCS.update(items)
            metrics.BATCH_TOKENS.update(tokens)
        metrics.BATCHES.inc(done.batches)
        metrics.DOCS_TRUNCATED.inc(done.truncated)
        metrics.TOKENS.inc(done.tokens)
        metrics.TOKENS_DROPPED.inc(done.dropped_tokens)
        if done.chunks is not None:
            metrics.CHUNKS.inc(done.chunks.num_rows)
        yield done
