"""Embed: turn a unit's texts into float32 vectors, one model per worker process.

Consumes ``UnitRows``; produces ``UnitEmbeddings`` (vectors in the unit's row order). The model is
loaded once per process in ``setup`` through Beam's ``shared.Shared``, so DoFn instances, bundles
and retries in one process reuse it. The batching and the model loop are ``inference.embed_rows``;
documents the model fails on alone are rejected here (``model_error``) with the error.
"""

from __future__ import annotations

import json
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.utils import shared

from transforms import metrics, rejects
from transforms.checkpoint import OutputFolder
from transforms.inference import Embedded, embed_rows
from transforms.model import Embedder
from transforms.records import EmbedSettings, UnitEmbeddings, UnitRows

PROGRESS_EVERY_S = 5.0

# One model per process: DoFn instances, bundles, retries and (in-process runners) the driver all
# acquire the same loaded model through this handle, which lives as long as someone holds it.
_MODELS = shared.Shared()


def acquire_embedder(settings: EmbedSettings, loaded: Embedder | None = None) -> Embedder:
    """This process's model for ``settings``: loaded on first use, or ``loaded`` when given (the
    driver registers the model it already loaded, so in-process workers do not load it again)."""
    key = json.dumps([settings.model_path, settings.device, settings.precision, settings.normalize,
                      settings.max_seq_length, settings.prefix])
    return _MODELS.acquire(lambda: loaded or load_embedder(settings), tag=key)


def load_embedder(settings: EmbedSettings) -> Embedder:
    return Embedder(
        settings.model_path, settings.device, settings.precision, settings.normalize,
        settings.max_seq_length, settings.prefix, settings.threads,
    )


def with_model_errors(rows: UnitRows, embedded: Embedded) -> tuple[pa.Table, np.ndarray, pa.Table]:
    """(rows, vectors, rejections) with the documents the model failed on moved to the rejections."""
    if not embedded.failed:
        return rows.table, embedded.vectors, rows.rejects
    bad = sorted(embedded.failed)
    keep = np.ones(rows.table.num_rows, dtype=bool)
    keep[bad] = False
    failed_rows = rows.table.take(pa.array(bad))
    model_rejects = rejects.rejections(
        failed_rows.column("id"), failed_rows.column("_row"), rows.unit.source,
        ["model_error"] * len(bad), [embedded.failed[i] for i in bad],
    )
    return (rows.table.filter(pa.array(keep)), embedded.vectors[keep],
            pa.concat_tables([rows.rejects, model_rejects]).sort_by("row_index"))


class EmbedUnit(beam.DoFn):
    """UnitRows -> UnitEmbeddings."""

    def __init__(self, settings: EmbedSettings):
        self._settings = settings
        self._output = OutputFolder(settings.output)

    def setup(self):
        self._embedder = acquire_embedder(self._settings)

    def process(self, rows: UnitRows):
        unit = rows.unit
        texts = rows.table.column(self._settings.text_column).to_pylist()
        last = [time.monotonic()]

        def report(done: int):
            if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
                last[0] = time.monotonic()
                try:
                    self._output.write_progress(unit.unit_id, done + rows.rejects.num_rows, unit.rows,
                                               unit.text_bytes)
                except OSError:  # progress is best-effort; the unit's work is not
                    pass

        embedded = embed_rows(self._embedder, texts, self._settings, report)
        for docs, tokens, padded, seconds in embedded.batch_stats:
            metrics.BATCH_LATENCY_MS.update(int(seconds * 1000))
            metrics.BATCH_DOCS.update(docs)
            metrics.BATCH_TOKENS.update(tokens)
        metrics.BATCHES.inc(embedded.batches)
        table, vectors, rejected = with_model_errors(rows, embedded)
        metrics.DOCS_TRUNCATED.inc(embedded.truncated)
        metrics.TOKENS.inc(embedded.tokens)
        seconds = {**rows.seconds, "tokenize": embedded.tokenize_s, "forward": embedded.forward_s}
        stats = [[d, t, p, round(s, 6)] for d, t, p, s in embedded.batch_stats]
        yield UnitEmbeddings(unit, table, rejected, vectors, embedded.truncated, embedded.tokens,
                             embedded.padded_tokens, embedded.batches, seconds, stats, rows.started_at)
