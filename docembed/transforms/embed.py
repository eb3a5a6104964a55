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
"""

from __future__ import annotations

import dataclasses
import json
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
from docembed.errors import ModelError, UnitAbandoned
from docembed.transforms.inference import check_model_errors, embed_rows, embed_windows
from docembed.model.card import ModelCard
from docembed.model.embedder import Embedder
from docembed.model.ref import materialize
from docembed.records import EmbedSettings, UnitEmbeddings, UnitRows

PROGRESS_EVERY_S = 5.0
STOP_CHECK_S = 1.0  # how often, at most, a worker looks for a stop request between batches

# One model per process: DoFn instances, bundles and retries all acquire the same loaded model
# through this handle, which lives as long as someone holds it.
_MODELS = shared.Shared()
_PROBES: "weakref.WeakKeyDictionary[Embedder, dict]" = weakref.WeakKeyDictionary()


def acquire_embedder(settings: EmbedSettings, resolved: dict) -> Embedder:
    """This process's model for ``settings`` at the ``resolved`` device and precision: loaded on
    first use, and checked against the launcher's description of it."""
    key = json.dumps([dataclasses.asdict(settings.model_ref), resolved["device"], resolved["precision"],
                      settings.normalize, settings.max_seq_length, settings.prefix, settings.truncate_dim,
                      settings.trust_remote_code])
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
    if key not in probes:
        probes[key] = canaries.probe(embedder, texts)
    mine = {**probes[key], "numerics": resolved}
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


def embed_unit(embedder: Embedder, rows: UnitRows, settings: EmbedSettings, on_batch=None) -> UnitEmbeddings:
    """A unit's vectors in the ``--long-docs`` mode asked for: each document's first window
    (truncate), the weighted mean of all its windows (mean), or every window as a row (chunks)."""
    texts = rows.table.column(settings.text_column).to_pylist()
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
    check_model_errors(embedded.failed, documents, settings.max_model_errors,
                       f"unit {unit.unit_id} ({unit.source} rows {unit.row_start}-{unit.row_end})")
    seconds = {**rows.seconds, "tokenize": embedded.tokenize_s, "forward": embedded.forward_s}
    stats = [[d, t, p, round(s, 6)] for d, t, p, s in embedded.batch_stats]
    unit_quality = quality.unit_stats(embedded.doc_tokens[keep],
                                      quality.mostly_non_letters(table.column(settings.text_column)), norms, vectors)
    return UnitEmbeddings(rows.unit, table, rejected, vectors, embedded.truncated, embedded.tokens,
                          embedded.padded_tokens, embedded.batches, seconds, stats, rows.started_at, chunks,
                          window_count, embedded.text_tokens, sum(n for i, n in embedded.dropped.items() if keep[i]),
                          retry=rows.retry, quality=unit_quality, text_digest=rows.text_digest)


class EmbedUnit(beam.DoFn):
    """UnitRows -> UnitEmbeddings."""

    def __init__(self, settings: EmbedSettings):
        self._settings = settings
        self._output = UnitStore(settings.output)

    def setup(self):
        self._numerics = numerics.resolve(self._settings.device, self._settings.precision)
        self._embedder = acquire_embedder(self._settings, self._numerics)
        self._canaries = probe_canaries(self._embedder, self._numerics, self._output, self._settings.canary_threshold)

    def process(self, rows: UnitRows):
        unit = rows.unit
        last = {"progress": time.monotonic(), "stop": time.monotonic()}

        def after_batch(done: int):
            """Progress every few seconds; and the stop request checked between batches, not only
            between units, so that --grace-period holds however long a unit is."""
            now = time.monotonic()
            if now - last["stop"] >= STOP_CHECK_S:
                last["stop"] = now
                deadline = self._output.stop_deadline()
                if deadline is not None and time.time() >= deadline:
                    raise UnitAbandoned(unit.unit_id)
            if now - last["progress"] >= PROGRESS_EVERY_S:
                last["progress"] = now
                try:
                    self._output.write_progress(unit.unit_id, done + rows.rejects.num_rows, unit.rows,
                                               unit.text_bytes)
                except OSError:  # progress is best-effort; the unit's work is not
                    pass

        try:
            done = embed_unit(self._embedder, rows, self._settings, after_batch)
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
