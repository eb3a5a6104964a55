"""Inference: run the model over one unit's texts in length-sorted batches (pure: no Beam here).

Two ways in: ``embed_rows`` embeds each text's first window (tokens counted by ``tokens``);
``embed_windows`` embeds every window of every text (cut by ``chunk``). Either way, batches are
planned (``batch``) and each is tokenized in a helper thread while the model runs on the one before.
A batch the model fails on (an out-of-memory error, say) is split in halves and retried down to
single items. A document that still fails alone is the document's fault only if the model still embeds
a known-good probe text: then it is returned as failed, with the error, and the rest go on. If the
probe fails too, the model or its device is broken and ``ModelFailed`` is raised; so it is when more of
a unit's documents fail than ``--max-model-errors`` allows (``check_model_errors``).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from docembed.transforms.prepare import chunk
from docembed.transforms.prepare.batch import padded_tokens, plan_batches
from docembed.errors import ModelFailed
from docembed.model.embedder import Embedder
from docembed.records import EmbedSettings
from docembed.transforms.prepare.tokens import dropped_tokens, first_windows

log = logging.getLogger(__name__)

# A plain sentence any working model embeds, a few tokens long so that it fits any window: the model
# is tried on it when a document fails alone.
PROBE = "A plain sentence."


@dataclasses.dataclass
class Embedded:
    """What ``embed_rows`` and ``embed_windows`` return: vectors (rows of failed items are left zero),
    the failed documents as {index: message}, counts (``tokens``: what the model saw, special tokens
    included), and seconds spent tokenizing and in the model."""

    vectors: np.ndarray
    failed: dict[int, str]
    truncated: int
    tokens: int
    padded_tokens: int
    batches: int
    norms: np.ndarray = None  # each vector's L2 norm before normalisation (0 where its item failed)
    doc_tokens: np.ndarray = None  # each document's whole text in tokens, special tokens excluded
    text_tokens: int = 0  # tokens of the embedded documents' whole texts, special tokens excluded
    dropped: dict[int, int] = dataclasses.field(default_factory=dict)  # truncate: {index: tokens cut off}
    tokenize_s: float = 0.0
    forward_s: float = 0.0
    # (documents, real tokens, padded tokens, seconds in the model) of each batch, in order.
    batch_stats: list[tuple[int, int, int, float]] = dataclasses.field(default_factory=list)


def embed_rows(embedder: Embedder, texts: list[str], settings: EmbedSettings, on_batch=None) -> Embedded:
    """Vectors for ``texts`` in order, each from its first window of tokens (``--long-docs truncate``).
    ``on_batch(docs_done)`` is called after each batch.

    Each text is tokenized once (``first_windows``): those ids give the lengths to sort by and the
    model's inputs. The tokens the window leaves out are counted too (``dropped_tokens``), so a run can
    say how much of its corpus the model never saw.
    """
    start = time.perf_counter()
    firsts = first_windows(texts, embedder.window_size, embedder.encode)
    lengths = firsts.lengths + embedder.overhead
    batches = plan_batches(lengths, settings.min_batch_size, settings.max_batch_size, settings.max_batch_tokens)
    out = Embedded(np.zeros((len(texts), embedder.dim), dtype=np.float32), {}, 0,
                   int(lengths.sum()), padded_tokens(lengths, batches), len(batches), np.zeros(len(texts), np.float32))
    prepare = lambda b: embedder.prepare_ids([firsts.ids[i] for i in b])  # noqa: E731
    # Counting what truncation drops reads the rest of long texts, which no pass has read yet. Beside
    # a GPU's model loop it runs in a thread on otherwise idle cores. On the CPU it runs first: there the
    # thread only competes with the model's own threads (on 2 cores, 8,000 documents and a near-null
    # model: 1.52 s threaded against 1.41 s first; with MiniLM no difference).
    with ThreadPoolExecutor(max_workers=1) as counter:
        if embedder.device == "cuda":
            dropped = counter.submit(dropped_tokens, texts, firsts, embedder.count)
        else:
            dropped = Future()
            dropped.set_result(dropped_tokens(texts, firsts, embedder.count))
        out.tokenize_s = time.perf_counter() - start
        run_batches(embedder, prepare, lengths, batches, out, on_batch)
        waited = time.perf_counter()
        out.dropped = dropped.result()
        out.tokenize_s += time.perf_counter() - waited
    kept = [i for i in range(len(texts)) if i not in out.failed]
    out.truncated = int(firsts.truncated[kept].sum())
    out.doc_tokens = firsts.lengths.copy()
    for i, n in out.dropped.items():
        out.doc_tokens[i] += n
    out.text_tokens = int(out.doc_tokens[kept].sum())
    return out


def embed_windows(embedder: Embedder, texts: list[str], settings: EmbedSettings, on_batch=None):
    """Vectors for every window of every text (``--long-docs mean`` and ``chunks``): (Embedded with
    one vector per window, the Windows). Windows of all the unit's documents are batched together by
    length, so a very long document's windows fill ordinary batches. ``on_batch(docs_done)`` gets an
    estimate: documents x the share of windows done. A window the model fails on fails its document.
    """
    start = time.perf_counter()
    tokens = chunk.tokenize(texts, embedder.encode_with_offsets)
    windows = chunk.plan_windows(texts, tokens, settings.chunk_spec(embedder.window_size))
    ids = [t.ids for t in tokens]  # the offsets are no longer needed: free them before the model loop
    del tokens
    lengths = windows.token_end - windows.token_start + embedder.overhead
    batches = plan_batches(lengths, settings.min_batch_size, settings.max_batch_size, settings.max_batch_tokens)
    out = Embedded(np.zeros((len(windows), embedder.dim), dtype=np.float32), {}, 0,
                   int(lengths.sum()), padded_tokens(lengths, batches), len(batches), np.zeros(len(windows), np.float32))
    out.tokenize_s = time.perf_counter() - start

    def prepare(batch):
        return embedder.prepare_ids([ids[d][a:b] for d, a, b in
                                     zip(windows.doc[batch], windows.token_start[batch], windows.token_end[batch])])

    share = (lambda done: on_batch(len(texts) * done // max(1, len(windows)))) if on_batch else None  # noqa: E731
    run_batches(embedder, prepare, lengths, batches, out, share)
    failed_windows, out.failed = out.failed, {}
    for w, message in failed_windows.items():
        out.failed.setdefault(int(windows.doc[w]), message)
    out.doc_tokens = np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids))
    out.text_tokens = int(out.doc_tokens[[d for d in range(len(ids)) if d not in out.failed]].sum())
    return out, windows


def run_batches(embedder: Embedder, prepare, lengths: np.ndarray, batches: list[np.ndarray], out: Embedded,
                on_batch=None) -> None:
    """The model loop: ``out.vectors[batch]`` for each batch, ``prepare(batch)`` (tokenizing) done in a
    helper thread for the next batch while the model runs on the current one. The tokenize time
    added is what the loop waited for it, so the stage times add up to the wall time. A batch that
    fails is split down to single items; items that still fail land in ``out.failed``."""
    done = 0
    with ThreadPoolExecutor(max_workers=1) as tokenizer_thread:
        pending = tokenizer_thread.submit(prepare, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            started = time.perf_counter()
            try:
                features = pending.result()
            except Exception:  # noqa: BLE001 - retried below, item by item if need be
                features = None
            if k + 1 < len(batches):
                pending = tokenizer_thread.submit(prepare, batches[k + 1])
            waited = time.perf_counter()
            if features is None or not _forward(embedder, features, batch, out):
                _embed_or_split(embedder, prepare, batch, out)
            finished = time.perf_counter()
            out.tokenize_s += waited - started
            out.forward_s += finished - waited
            out.batch_stats.append((len(batch), int(lengths[batch].sum()),
                                    len(batch) * int(lengths[batch].max()), finished - waited))
            done += len(batch)
            if on_batch:
                on_batch(done)


def _forward(embedder: Embedder, features: dict, batch: np.ndarray, out: Embedded) -> bool:
    try:
        out.vectors[batch], out.norms[batch] = embedder.forward_with_norms(features)
        return True
    except Exception:  # noqa: BLE001 - the caller splits the batch to find the failing documents
        embedder.release_memory()
        return False


def _embed_or_split(embedder: Embedder, prepare, batch: np.ndarray, out: Embedded) -> None:
    try:
        out.vectors[batch], out.norms[batch] = embedder.forward_with_norms(prepare(batch))
        return
    except Exception as exc:  # any model failure: torch raises OutOfMemoryError, RuntimeError, IndexError...
        embedder.release_memory()
        if len(batch) == 1:
            message = f"{type(exc).__name__}: {exc}"[:2000]
            check_health(embedder, message)
            out.failed[int(batch[0])] = message
            log.warning("model failed on one document, rejected as model_error: %s", message)
            return
        log.info("model failed on a batch of %d documents; retrying it in halves", len(batch))
    half = len(batch) // 2
    _embed_or_split(embedder, prepare, batch[:half], out)
    _embed_or_split(embedder, prepare, batch[half:], out)


def check_health(embedder: Embedder, error: str) -> None:
    """After a document failed alone with ``error``: raise ModelFailed unless the model still embeds
    the probe text (the document, not the model, is at fault)."""
    try:
        embedder.embed([PROBE])
    except Exception as exc:  # noqa: BLE001 - whatever the probe raises, the model is broken
        raise ModelFailed(
            f"worker {socket.gethostname()}: the model fails on a known-good probe text too ({type(exc).__name__}: "
            f"{str(exc)[:300]}), after a document failed with {error[:300]}: the model or its device is broken, "
            "so the unit is not committed; fix the cause and rerun to resume"
        ) from exc


def check_model_errors(failed: dict[int, str], documents: int, share: float, where: str) -> None:
    """Raise ModelFailed when more than max(1, share x documents) of a unit's documents failed."""
    allowed = max(1, int(share * documents))
    if len(failed) > allowed:
        raise ModelFailed(
            f"worker {socket.gethostname()}: the model failed on {len(failed)} of the {documents} documents of "
            f"{where}, more than --max-model-errors {share} allows ({allowed}); the first: "
            f"{next(iter(failed.values()))[:300]}. The unit is not committed: fix the cause (a smaller "
            "--max-batch-tokens, more memory, another device) or raise --max-model-errors, and rerun to resume"
        )
