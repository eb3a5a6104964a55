"""Embed: turn a unit's texts into float32 vectors in length-sorted batches, one model per worker process.

Consumes ``UnitRows``; produces ``UnitEmbeddings`` (vectors in the unit's row order). The model is
loaded once per process in ``setup`` through Beam's ``shared.Shared``, so DoFn instances, bundles
and retries in one process reuse it. A batch the model fails on (an out-of-memory error, say) is
split in halves and retried down to single documents; a document that still fails is rejected
(``model_error``) with the error, and the unit goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.utils import shared

from transforms import metrics, rejects
from transforms.batch import padded_tokens, plan_batches
from transforms.checkpoint import OutputFolder
from transforms.model import Embedder
from transforms.records import EmbedSettings, UnitEmbeddings, UnitRows
from transforms.tokens import count_tokens

PROGRESS_EVERY_S = 5.0
log = logging.getLogger(__name__)

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


@dataclasses.dataclass
class Embedded:
    """What ``embed_rows`` returns: vectors (rows of failed documents are left unset), the failed
    documents as {index: message}, and counts."""

    vectors: np.ndarray
    failed: dict[int, str]
    truncated: int
    tokens: int
    padded_tokens: int
    batches: int


def embed_rows(embedder: Embedder, texts: list[str], settings: EmbedSettings, on_batch=None) -> Embedded:
    """Vectors for ``texts`` in order. ``on_batch(docs_done)`` is called after each batch."""
    counted = count_tokens(texts, embedder.max_seq_length, embedder.token_lengths)
    batches = plan_batches(
        counted.lengths, settings.min_batch_size, settings.max_batch_size, settings.max_batch_tokens
    )
    vectors = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    failed: dict[int, str] = {}
    done = 0
    for batch in batches:
        start = time.perf_counter()
        _embed_or_split(embedder, counted.texts, batch, vectors, failed)
        metrics.BATCH_LATENCY_MS.update(int((time.perf_counter() - start) * 1000))
        metrics.BATCH_DOCS.update(len(batch))
        metrics.BATCH_TOKENS.update(int(counted.lengths[batch].sum()))
        metrics.BATCHES.inc()
        done += len(batch)
        if on_batch:
            on_batch(done)
    truncated = int(counted.truncated[[i for i in range(len(texts)) if i not in failed]].sum())
    return Embedded(vectors, failed, truncated, int(counted.lengths.sum()),
                    padded_tokens(counted.lengths, batches), len(batches))


def _embed_or_split(embedder: Embedder, texts: list[str], batch: np.ndarray, vectors, failed) -> None:
    try:
        vectors[batch] = embedder.embed([texts[i] for i in batch])
        return
    except Exception as exc:  # any model failure: torch raises OutOfMemoryError, RuntimeError, IndexError...
        embedder.release_memory()
        if len(batch) == 1:
            failed[int(batch[0])] = f"{type(exc).__name__}: {exc}"[:2000]
            log.warning("model failed on one document, rejected as model_error: %s", failed[int(batch[0])])
            return
        metrics.BATCH_SPLITS.inc()
    half = len(batch) // 2
    _embed_or_split(embedder, texts, batch[:half], vectors, failed)
    _embed_or_split(embedder, texts, batch[half:], vectors, failed)


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
                self._output.write_progress(unit.unit_id, done + rows.rejects.num_rows, unit.rows)
                last[0] = time.monotonic()

        embedded = embed_rows(self._embedder, texts, self._settings, report)
        table, vectors, rejected = with_model_errors(rows, embedded)
        metrics.DOCS_TRUNCATED.inc(embedded.truncated)
        metrics.TOKENS.inc(embedded.tokens)
        yield UnitEmbeddings(unit, table, rejected, vectors, embedded.truncated, embedded.tokens,
                             embedded.padded_tokens, embedded.batches)
