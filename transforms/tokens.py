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
