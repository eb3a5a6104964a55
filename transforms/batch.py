"""Batch: cut a unit's documents into length-sorted batches within a document count and a token budget.

Sorting a whole unit (thousands of documents) by token length before cutting makes each batch's
documents similar in length, so little compute goes to padding (sentence-transformers sorts only
within one ``encode`` call; Beam's ``BatchElements`` not at all without a stateful path).
"""

from __future__ import annotations

import numpy as np


def plan_batches(lengths: np.ndarray, min_size: int, max_size: int, max_tokens: int) -> list[np.ndarray]:
    """Indices of each batch, longest documents first.

    Each batch holds ``min_size`` to ``max_size`` documents (only the last may hold fewer), and its
    padded size, documents x longest length, stays within ``max_tokens``. The caller guarantees
    ``min_size * window <= max_tokens``, so both bounds always hold together.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches = []
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(min_size, min(max_size, max_tokens // longest))
        batches.append(order[start : start + size])
        start += size
    return batches


def padded_tokens(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    """Tokens the model processes, padding included: the sum of size x longest over batches."""
    return int(sum(len(b) * int(lengths[b].max()) for b in batches if len(b)))
