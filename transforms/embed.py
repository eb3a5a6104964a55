"""Embed: turn a unit's texts into float32 vectors in length-sorted batches, one model per worker process.

Consumes ``UnitRows``; produces ``UnitEmbeddings`` (vectors in the unit's row order). The model is
loaded once per process in ``setup`` through Beam's ``shared.Shared``, so DoFn instances, bundles
and retries in one process reuse it.
"""

from __future__ import annotations

import json
import time

import apache_beam as beam
import numpy as np
from apache_beam.utils import shared

from transforms import metrics
from transforms.batch import padded_tokens, plan_batches
from transforms.checkpoint import OutputFolder
from transforms.model import Embedder
from transforms.records import EmbedSettings, UnitEmbeddings, UnitRows
from transforms.tokens import count_tokens

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
        settings.max_seq_length, settings.prefix,
    )


def embed_rows(embedder: Embedder, texts: list[str], settings: EmbedSettings, on_batch=None):
    """Vectors for ``texts`` in order, plus (truncated, tokens, padded tokens, batches) counts.

    ``on_batch(docs_done)`` is called after each batch (progress reporting).
    """
    counted = count_tokens(texts, embedder.max_seq_length, embedder.token_lengths)
    batches = plan_batches(
        counted.lengths, settings.min_batch_size, settings.max_batch_size, settings.max_batch_tokens
    )
    vectors = np.empty((len(texts), embedder.dim), dtype=np.float32)
    done = 0
    for batch in batches:
        start = time.perf_counter()
        vectors[batch] = embedder.embed([counted.texts[i] for i in batch])
        metrics.BATCH_LATENCY_MS.update(int((time.perf_counter() - start) * 1000))
        metrics.BATCH_DOCS.update(len(batch))
        metrics.BATCH_TOKENS.update(int(counted.lengths[batch].sum()))
        metrics.BATCHES.inc()
        done += len(batch)
        if on_batch:
            on_batch(done)
    counts = (int(counted.truncated.sum()), int(counted.lengths.sum()),
              padded_tokens(counted.lengths, batches), len(batches))
    return vectors, counts


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
                self._output.write_progress(unit.unit_id, done + rows.rejects.num_rows, unit.rows)
                last[0] = time.monotonic()

        vectors, (truncated, tokens, padded, batches) = embed_rows(
            self._embedder, texts, self._settings, report
        )
        metrics.DOCS_TRUNCATED.inc(truncated)
        metrics.TOKENS.inc(tokens)
        yield UnitEmbeddings(unit, rows.table, rows.rejects, vectors, truncated, tokens, padded, batches)
