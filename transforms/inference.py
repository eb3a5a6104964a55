"""Inference: run the model over one unit's texts in length-sorted batches (pure: no Beam here).

Tokens are counted (``tokens``), batches planned (``batch``), and each batch is tokenized in a helper
thread while the model runs on the one before. A batch the model fails on (an out-of-memory error,
say) is split in halves and retried down to single documents; a document that still fails is
returned as failed, with the error, and the rest go on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from transforms.batch import padded_tokens, plan_batches
from transforms.model import Embedder
from transforms.records import EmbedSettings
from transforms.tokens import count_tokens

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Embedded:
    """What ``embed_rows`` returns: vectors (rows of failed documents are left zero), the failed
    documents as {index: message}, counts, and seconds spent tokenizing and in the model."""

    vectors: np.ndarray
    failed: dict[int, str]
    truncated: int
    tokens: int
    padded_tokens: int
    batches: int
    tokenize_s: float = 0.0
    forward_s: float = 0.0
    # (documents, real tokens, padded tokens, seconds in the model) of each batch, in order.
    batch_stats: list[tuple[int, int, int, float]] = dataclasses.field(default_factory=list)


def embed_rows(embedder: Embedder, texts: list[str], settings: EmbedSettings, on_batch=None) -> Embedded:
    """Vectors for ``texts`` in order. ``on_batch(docs_done)`` is called after each batch.

    The next batch is tokenized in a helper thread while the model runs on the current one. The
    tokenize time reported is what the model loop waited for it, so the stage times add up to the
    wall time.
    """
    start = time.perf_counter()
    counted = count_tokens(texts, embedder.max_seq_length, embedder.token_lengths)
    batches = plan_batches(
        counted.lengths, settings.min_batch_size, settings.max_batch_size, settings.max_batch_tokens
    )
    out = Embedded(np.zeros((len(texts), embedder.dim), dtype=np.float32), {}, 0,
                   int(counted.lengths.sum()), padded_tokens(counted.lengths, batches), len(batches))
    out.tokenize_s = time.perf_counter() - start
    done = 0
    with ThreadPoolExecutor(max_workers=1) as tokenizer_thread:
        prepare = lambda b: tokenizer_thread.submit(embedder.prepare, [counted.texts[i] for i in b])  # noqa: E731
        pending = prepare(batches[0]) if batches else None
        for k, batch in enumerate(batches):
            started = time.perf_counter()
            try:
                features = pending.result()
            except Exception:  # noqa: BLE001 - retried below, document by document if need be
                features = None
            if k + 1 < len(batches):
                pending = prepare(batches[k + 1])
            waited = time.perf_counter()
            if features is None or not _forward(embedder, features, batch, out.vectors):
                _embed_or_split(embedder, counted.texts, batch, out.vectors, out.failed)
            finished = time.perf_counter()
            out.tokenize_s += waited - started
            out.forward_s += finished - waited
            out.batch_stats.append((len(batch), int(counted.lengths[batch].sum()),
                                    len(batch) * int(counted.lengths[batch].max()), finished - waited))
            done += len(batch)
            if on_batch:
                on_batch(done)
    out.truncated = int(counted.truncated[[i for i in range(len(texts)) if i not in out.failed]].sum())
    return out


def _forward(embedder: Embedder, features: dict, batch: np.ndarray, vectors: np.ndarray) -> bool:
    try:
        vectors[batch] = embedder.forward(features)
        return True
    except Exception:  # noqa: BLE001 - the caller splits the batch to find the failing documents
        embedder.release_memory()
        return False


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
        log.info("model failed on a batch of %d documents; retrying it in halves", len(batch))
    half = len(batch) // 2
    _embed_or_split(embedder, texts, batch[:half], vectors, failed)
    _embed_or_split(embedder, texts, batch[half:], vectors, failed)
