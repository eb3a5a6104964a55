"""Batch: cut a unit's documents into length-sorted batches within a document count and a token budget.

Sorting a whole unit (thousands of documents) by token length before cutting makes each batch's
documents similar in length, so little compute goes to padding (sentence-transformers sorts one
``encode`` call by characters and cuts fixed batches; Beam's ``BatchElements`` does not sort at all
without a stateful path). Where to cut is then chosen by dynamic programming to minimise the padded
tokens, plus a small per-batch overhead, within the bounds.
"""

from __future__ import annotations

import numpy as np

# Cost of one more batch, in tokens: favours fewer, fuller batches when padding is equal
# (per-batch Python and kernel-launch overhead).
BATCH_OVERHEAD_TOKENS = 256


def plan_batches(lengths: np.ndarray, min_size: int, max_size: int, max_tokens: int) -> list[np.ndarray]:
    """Indices of each batch, longest documents first.

    Each batch holds ``min_size`` to ``max_size`` documents (only the last, of the shortest
    documents, may hold fewer), and its padded size, documents x longest length, stays within
    ``max_tokens``. A unit of fewer than ``min_size`` documents cannot fill one batch anyway, so its
    batches may be of any size: a few long documents then do not pad many short ones to their length.
    The caller guarantees ``min_size * window <= max_tokens``, so both bounds can always hold together. Among the cuts that respect them, the one with the fewest padded tokens
    (plus ``BATCH_OVERHEAD_TOKENS`` per batch) is taken.
    """
    lengths = np.asarray(lengths)
    if len(lengths) < min_size:
        min_size = 1
    order = np.argsort(-lengths, kind="stable")
    sizes = _best_sizes(np.maximum(lengths[order], 1), min_size, max_size, max_tokens)
    bounds = np.cumsum([0] + sizes)
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def _best_sizes(sorted_lengths: np.ndarray, min_size: int, max_size: int, max_tokens: int) -> list[int]:
    """Batch sizes, in order, minimising padded tokens over documents sorted longest first.

    ``cost[j]``: the least cost of batching the first j documents; a batch of documents i..j-1 costs
    (j - i) x length[i] (its first document is its longest) plus the overhead. A batch holds at least
    ``min_size`` documents, so the costs of ``min_size`` consecutive ends depend only on earlier ones:
    they are found together, in one array operation (``_best_starts``), not one Python step each.
    """
    n = len(sorted_lengths)
    if n == 0:
        return []
    cost = np.full(n + 1, np.inf)
    cost[0] = 0.0
    start = np.zeros(n + 1, dtype=np.int64)
    sizes = np.arange(max_size, min_size - 1, -1)  # largest first: ties go to the earliest start, i
    for k in range(1, n, min_size):  # only the last batch may be short: j = n comes after
        j = np.arange(k, min(k + min_size, n))
        cost[j], start[j] = _best_starts(j, sizes, sorted_lengths, cost, max_tokens)
    j = np.array([n])
    cost[n], start[n] = (x[0] for x in _best_starts(j, np.arange(max_size, 0, -1), sorted_lengths, cost, max_tokens))
    if not np.isfinite(cost[n]):  # no cut meets every bound (fewer than min_size documents in all)
        return [n]
    cuts, j = [], n
    while j > 0:
        cuts.append(j - int(start[j]))
        j = int(start[j])
    return cuts[::-1]


def _best_starts(ends: np.ndarray, sizes: np.ndarray, sorted_lengths: np.ndarray, cost: np.ndarray,
                 max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """For each batch end j in ``ends``: the least cost of the documents before it and the start i of
    its last batch, over batches of ``sizes`` (j - i) that start at a document and keep to the budget."""
    i = ends[:, None] - sizes[None, :]
    inside = i >= 0
    i = np.maximum(i, 0)
    padded = sizes[None, :] * sorted_lengths[i]
    total = cost[i] + padded + BATCH_OVERHEAD_TOKENS
    total[~inside | (padded > max_tokens)] = np.inf
    best = np.argmin(total, axis=1)
    rows = np.arange(len(ends))
    return total[rows, best], i[rows, best]


def padded_tokens(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    """Tokens the model processes, padding included: the sum of size x longest over batches."""
    return int(sum(len(b) * int(lengths[b].max()) for b in batches if len(b)))
