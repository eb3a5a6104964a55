"""Inference: run the model over one unit's texts in length-sorted batches (pure: no Beam here).

Two ways in: ``embed_rows`` embeds each text's first window (tokens counted by ``tokens``);
``embed_windows`` embeds every window of every text (cut by ``chunk``). Either way, batches are
planned (``batch``) and each is tokenized in a helper thread while the model runs on the one before.
A batch the model fails on (an out-of-memory error, say) is split in halves and retried down to
single items. A document that still fails alone is the document's fault only if the model still embeds
a known-good probe text: then it is returned as failed, with the error, and the rest go on. If the
probe fails too, the model or its device is broken and ``ModelFailed`` is raised; so it is when more of
a unit's documents fail than ``--max-model-errors`` allows (``check_model_errors``).

Three failures a GPU brings are handled apart:

- a CUDA error ("CUDA error: device-side assert triggered", ``torch.AcceleratorError``) poisons the
  process's CUDA context: every later CUDA call fails. ``DeviceFailed`` is raised at the first one,
  and ``device_failures()`` counts it, so that ``embed.acquire_embedder`` loads a new model rather than
  hand the broken one to a retry. Only a new process gets a working context: Beam's runners on
  Dataflow give a failed work item to another worker process; in one process, retries fail again.
- out of device memory on a single document: the memory may be held by the other harness thread's
  batch, so it is freed and the document retried after a pause (``OOM_RETRY_PAUSES_S``); still short,
  the unit fails (``ModelFailed``, advising a smaller ``--max-batch-tokens`` or fewer harness threads).
- non-finite vectors (NaN, inf: fp16 overflowing in a model trained in bf16) are checked after each
  batch. Every row of a batch of several, or the probe text too: the precision, not the documents, is
  at fault and ``NonFiniteVectors`` is raised at once. Some rows only, with the probe finite: those
  documents fail like any other model error (rejected as ``model_error`` within ``--max-model-errors``),
  with a reason naming the precision.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from docembed.transforms.prepare import chunk
from docembed.transforms.prepare.batch import padded_tokens, plan_batches
from docembed.errors import DeviceFailed, ModelFailed, NonFiniteVectors
from docembed.model.embedder import Embedder
from docembed.records import EmbedSettings
from docembed.transforms.prepare.tokens import dropped_tokens, estimated_dropped, first_windows

log = logging.getLogger(__name__)

# A plain sentence any working model embeds, a few tokens long so that it fits any window: the model
# is tried on it when a document fails alone.
PROBE = "A plain sentence."

# Pauses before each retry of a single document that ran out of device memory: long enough for the
# other harness thread's batch to finish and give its memory back.
OOM_RETRY_PAUSES_S = (0.5, 2.0, 5.0)

# Documents sorted and batched together on an accelerator (``embed_rows``): about 16 batches of the
# largest size, so a block's sorting keeps padding low while its tokenizing overlaps the model.
SORT_BLOCK = 4096
FIRST_BLOCK = 256  # a unit's first block, smaller: the device waits for it at each unit's start

_device_failures = 0  # DeviceFailed raised in this process so far (see device_failures)


def device_failures() -> int:
    """How many times this process found its device unusable: a model acquired before the last time
    is broken for good (``embed.acquire_embedder`` keys its shared model on this)."""
    return _device_failures


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error (``torch.OutOfMemoryError``; the CUDA driver's own "out of memory"
    error as well): the device is short now, not broken."""
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or str(exc).startswith("CUDA error: out of memory")


def is_device_fatal(exc: BaseException) -> bool:
    """A CUDA error other than memory short (a device-side assert, an illegal address...): the CUDA
    context is poisoned and every later call of the process fails. torch 2.13 raises
    ``torch.AcceleratorError``; older ones a RuntimeError whose message starts "CUDA error"."""
    if is_out_of_memory(exc):
        return False
    fatal = getattr(sys.modules.get("torch"), "AcceleratorError", None)
    return (fatal is not None and isinstance(exc, fatal)) or (
        isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error"))


def raise_if_device_fatal(embedder: Embedder, exc: BaseException) -> None:
    """Raise DeviceFailed, and count it, where ``exc`` left the device unusable: no retry, no split,
    no probe (each would only fail the same way), and no ``release_memory`` (it is a CUDA call too)."""
    global _device_failures
    if not is_device_fatal(exc):
        return
    _device_failures += 1
    raise DeviceFailed(
        f"worker {socket.gethostname()}: {type(exc).__name__}: {str(exc)[:300]}. The CUDA context is unusable "
        f"after such an error (every later CUDA call of the process fails), so this worker process must restart; "
        "its model is dropped and the unit is not committed. Beam gives a failed work item to a new worker "
        "process on Dataflow; elsewhere rerun to resume. A device-side assert is often an input the model cannot "
        "take (a token id or position past its tables: check --max-seq-length against the model)"
    ) from exc


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
    say how much of its corpus the model never saw; with ``--count-dropped estimate`` they are estimated
    from their characters instead (``estimated_dropped``), and only what the model sees is tokenized.

    On the CPU the whole unit is sorted and batched at once (the least padding). On an accelerator
    (``Embedder.frees_host``) the unit is taken in blocks (``sort_blocks``: doubling from
    ``FIRST_BLOCK`` to ``SORT_BLOCK`` documents), each sorted and batched on its own, and the next
    block is tokenized in a helper thread while the model runs on this one: the device waits for the
    first block's tokenizing, not the whole unit's (a few more padded tokens: each block is sorted apart).
    """
    start = time.perf_counter()
    n = len(texts)
    out = Embedded(np.zeros((n, embedder.dim), dtype=np.float32), {}, 0, 0, 0, 0, np.zeros(n, np.float32))
    blocks = sort_blocks(n, embedder.frees_host)
    lengths = np.zeros(n, dtype=np.int64)
    firsts, counts = [], []
    # Counting what truncation drops reads the rest of long texts, which no pass has read yet. Beside
    # a GPU's model loop it runs in the helper thread on otherwise idle cores. On the CPU it runs first: there the
    # thread only competes with the model's own threads (on 2 cores, 8,000 documents and a near-null
    # model: 1.52 s threaded against 1.41 s first; with MiniLM no difference).
    with ThreadPoolExecutor(max_workers=1) as tokenizer:
        window_of = lambda block: first_windows(texts[block.start:block.stop], embedder.window_size,  # noqa: E731
                                                embedder.encode)
        pending = tokenizer.submit(window_of, blocks[0]) if blocks else None
        out.tokenize_s = time.perf_counter() - start
        for k, block in enumerate(blocks):
            waited = time.perf_counter()
            found = pending.result()
            if k + 1 < len(blocks):
                pending = tokenizer.submit(window_of, blocks[k + 1])
            firsts.append(found)
            # After the next block's ids in the same thread: at most one block's count is left at the end.
            counts.append(_count_dropped(embedder, settings, tokenizer, texts[block.start:block.stop], found))
            out.tokenize_s += time.perf_counter() - waited
            _run_block(embedder, settings, block, found, lengths, out, on_batch)
        waited = time.perf_counter()
        for block, count in zip(blocks, counts):
            out.dropped.update({block.start + i: d for i, d in count.result().items()})
        out.tokenize_s += time.perf_counter() - waited
    kept = [i for i in range(n) if i not in out.failed]
    truncated = np.concatenate([f.truncated for f in firsts]) if firsts else np.zeros(0, bool)
    out.truncated = int(truncated[kept].sum())
    out.doc_tokens = np.concatenate([f.lengths for f in firsts]) if firsts else np.zeros(0, np.int64)
    for i, d in out.dropped.items():
        out.doc_tokens[i] += d
    out.text_tokens = int(out.doc_tokens[kept].sum())
    return out


def sort_blocks(n: int, accelerator: bool) -> list[range]:
    """The blocks a unit of ``n`` documents is sorted and batched in: the whole unit on the CPU; on an
    accelerator blocks doubling from ``FIRST_BLOCK`` up to ``SORT_BLOCK``, so that the device starts
    soon after the unit does and each block's model loop covers most of the next one's tokenizing."""
    if not accelerator:
        return [range(0, n)] if n else []
    blocks, start, size = [], 0, FIRST_BLOCK
    while start < n:
        blocks.append(range(start, min(n, start + size)))
        start, size = start + size, min(SORT_BLOCK, 2 * size)
    return blocks


def _count_dropped(embedder: Embedder, settings: EmbedSettings, counter: ThreadPoolExecutor, texts: list[str],
                   found) -> Future:
    """``dropped_tokens`` of a block: in the counter thread beside an accelerator, else now; or, with
    ``--count-dropped estimate``, ``estimated_dropped`` now (it tokenizes nothing)."""
    done = Future()
    if settings.count_dropped == "estimate":
        done.set_result(estimated_dropped(texts, found))
    elif embedder.frees_host:
        return counter.submit(dropped_tokens, texts, found, embedder.count)
    else:
        done.set_result(dropped_tokens(texts, found, embedder.count))
    return done


def _run_block(embedder: Embedder, settings: EmbedSettings, block: range, found, lengths: np.ndarray,
               out: Embedded, on_batch) -> None:
    """One block's batches, planned by length (``plan_batches``), through the model loop; ``lengths``
    and ``out`` are the unit's, indexed by its rows."""
    lengths[block.start:block.stop] = found.lengths + embedder.overhead
    mine = lengths[block.start:block.stop]
    batches = plan_batches(mine, settings.min_batch_size, settings.max_batch_size, settings.max_batch_tokens)
    out.tokens += int(mine.sum())
    out.padded_tokens += padded_tokens(mine, batches)
    out.batches += len(batches)
    prepare = lambda b: embedder.prepare_ids([found.ids[i - block.start] for i in b])  # noqa: E731
    done = (lambda d: on_batch(block.start + d)) if on_batch else None  # noqa: E731
    run_batches(embedder, prepare, lengths, [b + block.start for b in batches], out, done)


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
    try:
        run_batches(embedder, prepare, lengths, batches, out, share)
    except NonFiniteVectors as exc:  # its rows are windows here: name their documents
        exc.rows = sorted({int(windows.doc[w]) for w in exc.rows})
        raise
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
        vectors, norms = embedder.forward_with_norms(features)
    except Exception as exc:  # noqa: BLE001 - the caller splits the batch to find the failing documents
        raise_if_device_fatal(embedder, exc)
        embedder.release_memory()
        return False
    _store(embedder, batch, vectors, norms, out)
    return True


def _embed_or_split(embedder: Embedder, prepare, batch: np.ndarray, out: Embedded) -> None:
    try:
        vectors, norms = embedder.forward_with_norms(prepare(batch))
    except Exception as exc:  # any model failure: torch raises OutOfMemoryError, RuntimeError, IndexError...
        raise_if_device_fatal(embedder, exc)
        embedder.release_memory()
        error = exc
    else:
        _store(embedder, batch, vectors, norms, out)
        return
    if len(batch) == 1:
        _failed_alone(embedder, prepare, batch, out, error)
        return
    log.info("model failed on a batch of %d documents; retrying it in halves", len(batch))
    half = len(batch) // 2
    _embed_or_split(embedder, prepare, batch[:half], out)
    _embed_or_split(embedder, prepare, batch[half:], out)


def _failed_alone(embedder: Embedder, prepare, batch: np.ndarray, out: Embedded, error: Exception) -> None:
    """One document the model failed on alone: short of memory, it is retried; otherwise it is the
    document's failure if the probe passes (``check_health``)."""
    if is_out_of_memory(error):
        _retry_out_of_memory(embedder, prepare, batch, out, error)
        return
    message = f"{type(error).__name__}: {error}"[:2000]
    check_health(embedder, message)
    out.failed[int(batch[0])] = message
    log.warning("model failed on one document, rejected as model_error: %s", message)


def _retry_out_of_memory(embedder: Embedder, prepare, batch: np.ndarray, out: Embedded, error: Exception) -> None:
    """A single document out of memory is not the document's fault (another batch in flight may hold
    the memory): retry it after each pause, its cached memory freed; still short, fail the unit."""
    for attempt, pause in enumerate(OOM_RETRY_PAUSES_S, 1):
        log.warning("out of device memory on a single document; retry %d of %d in %.1f s",
                    attempt, len(OOM_RETRY_PAUSES_S), pause)
        time.sleep(pause)
        embedder.release_memory()
        try:
            vectors, norms = embedder.forward_with_norms(prepare(batch))
        except Exception as exc:  # noqa: BLE001 - sorted below: memory again, the device, or the document
            raise_if_device_fatal(embedder, exc)
            embedder.release_memory()
            if not is_out_of_memory(exc):
                _failed_alone(embedder, prepare, batch, out, exc)
                return
            error = exc
        else:
            _store(embedder, batch, vectors, norms, out)
            return
    raise ModelFailed(
        f"worker {socket.gethostname()}: the model ran out of {embedder.device} memory on a single document even "
        f"after {len(OOM_RETRY_PAUSES_S)} retries with the cached memory released ({type(error).__name__}: "
        f"{str(error)[:300]}); the document is not rejected, as the memory may be held by other batches in this "
        "process, and the unit is not committed: use a smaller --max-batch-tokens or fewer harness threads "
        "(--number_of_worker_harness_threads), or a device with more memory, and rerun to resume"
    ) from error


def _store(embedder: Embedder, batch: np.ndarray, vectors: np.ndarray, norms: np.ndarray, out: Embedded) -> None:
    """A batch's vectors into ``out``, refusing non-finite ones (``_refuse_non_finite``)."""
    out.vectors[batch], out.norms[batch] = vectors, norms
    bad = ~(np.isfinite(vectors).all(axis=1) & np.isfinite(norms))
    if bad.any():
        _refuse_non_finite(embedder, batch, bad, out)


def _refuse_non_finite(embedder: Embedder, batch: np.ndarray, bad: np.ndarray, out: Embedded) -> None:
    """Rows with NaN or inf never reach a commit. All rows of a batch of several, or the probe text
    too: the model at this precision is at fault (NonFiniteVectors, at once: the rest of the unit
    would overflow the same way). Else each such document failed, as a document the model fails on."""
    what = (f"non-finite vector (NaN or inf) from the model at precision {embedder.precision} on "
            f"{embedder.device}")
    advice = "fp16 overflows in models trained in bf16: use --precision bf16 or fp32"
    if bad.all() and len(batch) > 1:
        where = f"for all {len(batch)} documents of a batch"
    elif not _probe_finite(embedder):
        where = f"for {int(bad.sum())} of a batch's {len(batch)} documents and for the probe text too"
    else:
        where = None
    if where:
        raise NonFiniteVectors(f"worker {socket.gethostname()}: {what} {where}; {advice}. The unit is not "
                               "committed", rows=batch[bad])
    for row in batch[bad]:
        out.vectors[row], out.norms[row] = 0, 0
        out.failed[int(row)] = f"{what}, the probe text's finite; {advice}"
    log.warning("%s for %d documents, rejected as model_error", what, int(bad.sum()))


def _probe_finite(embedder: Embedder) -> bool:
    try:
        return bool(np.isfinite(embedder.embed([PROBE])).all())
    except Exception as exc:  # noqa: BLE001 - a probe that fails is no finite probe
        raise_if_device_fatal(embedder, exc)
        return False


def check_health(embedder: Embedder, error: str) -> None:
    """After a document failed alone with ``error``: raise ModelFailed unless the model still embeds
    the probe text (the document, not the model, is at fault)."""
    try:
        embedder.embed([PROBE])
    except Exception as exc:  # noqa: BLE001 - whatever the probe raises, the model is broken
        raise_if_device_fatal(embedder, exc)
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
