"""Tokens: bounded-memory token counting and exact truncation for a unit's texts.

The tokenizer is never handed a whole multi-megabyte cell. Each text is first cut to a prefix of
``CHARS_PER_TOKEN * window`` characters, at a whitespace boundary, because every tokenizer docembed
supports splits words at whitespace: the tokens of such a prefix are exactly the first tokens of the
full text. A prefix that still yields more tokens than the window proves the text is truncated and
holds every token the model will see; one that does not is widened (x4) and counted again, until it
either proves truncation or is the whole text. So truncation stays exact and memory stays bounded.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CHARS_PER_TOKEN = 8
PIECE_CHARS = 1 << 16
CALL_CHARS = 1 << 18
_WHITESPACE = (" ", "\n", "\t", "\r")


@dataclasses.dataclass
class Counted:
    """The texts to embed (capped prefixes), their token lengths (<= window) and truncation flags."""

    texts: list[str]
    lengths: np.ndarray
    truncated: np.ndarray


def cap_text(text: str, max_chars: int) -> str:
    """``text`` itself when short enough, else its prefix of at most ``max_chars`` characters,
    ending just before a whitespace character when one lies in the second half of the prefix."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = max(head.rfind(c) for c in _WHITESPACE)
    return head[:cut] if cut > max_chars // 2 else head


def split_at_whitespace(text: str, max_chars: int) -> list[tuple[int, int]]:
    """Spans ``[a, b)`` that tile ``text``, each at most ``max_chars`` long and, where the text allows,
    ending just before whitespace (``cap_text``'s rule), so that tokenizing the spans one by one
    gives the same tokens as tokenizing the whole text. An empty text has one empty span."""
    spans, start = [], 0
    while len(text) - start > max_chars:
        end = start + len(cap_text(text[start:start + max_chars + 1], max_chars))
        spans.append((start, end))
        start = end
    spans.append((start, len(text)))
    return spans


def piece_batches(texts: list[str]):
    """Every piece of ``texts`` as (text index, start, end), pieces of at most ``PIECE_CHARS`` cut by
    ``split_at_whitespace``, grouped into tokenizer calls of at most ``CALL_CHARS`` characters: the
    tokenizer returns Python objects (ids, offsets), about 200 bytes a token, so this bounds them."""
    batch, size = [], 0
    for i, text in enumerate(texts):
        for a, b in split_at_whitespace(text, PIECE_CHARS):
            if batch and size + b - a > CALL_CHARS:
                yield batch
                batch, size = [], 0
            batch.append((i, a, b))
            size += b - a
    if batch:
        yield batch


def full_lengths(texts: list[str], count) -> np.ndarray:
    """Every token of each text (special tokens excluded), counted piece by piece so that a
    multi-megabyte text never reaches the tokenizer whole. ``count(texts)`` counts tokens without
    special tokens or truncation (the Embedder's ``count_tokens``)."""
    counts = np.zeros(len(texts), dtype=np.int64)
    for batch in piece_batches(texts):
        np.add.at(counts, [i for i, _, _ in batch], count([texts[i][a:b] for i, a, b in batch]))
    return counts


def count_tokens(texts: list[str], window: int, token_lengths) -> Counted:
    """Cap, count and flag truncation for ``texts`` against a ``window`` of tokens.

    ``token_lengths(texts, limit)`` counts tokens up to ``limit`` (the Embedder's method).
    """
    max_chars = CHARS_PER_TOKEN * window
    capped = [cap_text(t, max_chars) for t in texts]
    lengths = token_lengths(capped, window + 1)
    unsure = _unsure(texts, capped, lengths, window)
    while unsure.size:
        max_chars *= 4
        for i in unsure:
            capped[i] = cap_text(texts[i], max_chars)
        lengths[unsure] = token_lengths([capped[i] for i in unsure], window + 1)
        unsure = unsure[[len(capped[i]) < len(texts[i]) and lengths[i] <= window for i in unsure]]
    truncated = lengths > window
    return Counted(capped, np.minimum(lengths, window), truncated)


def _unsure(texts, capped, lengths, window) -> np.ndarray:
    """Texts that were cut but whose prefix does not yet prove they exceed the window."""
    return np.array(
        [i for i, (t, c) in enumerate(zip(texts, capped)) if len(c) < len(t) and lengths[i] <= window],
        dtype=np.int64,
    )
