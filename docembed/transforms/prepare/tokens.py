"""Tokens: each text's first window of token ids, tokenized once, with exact truncation and bounded memory.

The tokenizer is never handed a whole multi-megabyte cell. Each text is first cut to a prefix of
``CHARS_PER_TOKEN * window`` characters, at a whitespace boundary, because every tokenizer docembed
supports splits words at whitespace: the tokens of such a prefix are exactly the first tokens of the
full text. A prefix that still yields more tokens than the window proves the text is truncated and
holds every token the model will see; one that does not is widened (``widened``: to what its own
characters per token say the window needs, with a margin) and tokenized again, until it either proves
truncation or is the whole text. So truncation stays exact and memory stays bounded. English prose
runs at about 4 to 5 characters a token in BERT's WordPiece, so a prefix of 5 a token reads little past
the window, and a text that needs more is widened once, to its own rate, rather than by a fixed factor.

The ids found are the model's inputs (``first_windows``): the pass that gives the lengths to sort by
is the only tokenization of the window. What truncation drops is counted from the same pass plus the
text after the prefix (``dropped_tokens``), which no earlier pass has read, so every character is
tokenized once. Where reading the whole text costs more than it tells (``--count-dropped estimate``,
for a GPU's host), ``estimated_dropped`` counts the rest from its characters instead, at the rate of the
document's own prefix.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CHARS_PER_TOKEN = 5
PIECE_CHARS = 1 << 16
CALL_CHARS = 1 << 18
ENCODE_CHUNK = 512  # texts per tokenizer call: bounds the Python lists of ids held at once
_WHITESPACE = (" ", "\n", "\t", "\r")


@dataclasses.dataclass
class FirstWindows:
    """Each text's first window of content token ids (int32, at most ``window``), the tokens of the
    prefix read (``read``, all of them), and where that prefix ends (``read_chars``)."""

    ids: list[np.ndarray]
    read: np.ndarray
    read_chars: np.ndarray
    window: int

    @property
    def lengths(self) -> np.ndarray:
        return np.minimum(self.read, self.window)

    @property
    def truncated(self) -> np.ndarray:
        return self.read > self.window


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
    special tokens or truncation (the Embedder's ``count``)."""
    counts = np.zeros(len(texts), dtype=np.int64)
    for batch in piece_batches(texts):
        np.add.at(counts, [i for i, _, _ in batch], count([texts[i][a:b] for i, a, b in batch]))
    return counts


def first_windows(texts: list[str], window: int, encode) -> FirstWindows:
    """Each text's first ``window`` content tokens. ``encode(texts)`` gives each text's token ids
    without special tokens or truncation (the Embedder's ``encode``)."""
    max_chars = np.full(len(texts), CHARS_PER_TOKEN * window, dtype=np.int64)
    capped = [cap_text(t, CHARS_PER_TOKEN * window) for t in texts]
    ids: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    read = np.zeros(len(texts), dtype=np.int64)

    def tokenize(indices):
        for start in range(0, len(indices), ENCODE_CHUNK):
            chunk = indices[start:start + ENCODE_CHUNK]
            for i, tokens in zip(chunk, encode([capped[i] for i in chunk])):
                ids[i], read[i] = np.asarray(tokens[:window], dtype=np.int32), len(tokens)

    tokenize(range(len(texts)))
    unsure = [i for i in range(len(texts)) if len(capped[i]) < len(texts[i]) and read[i] <= window]
    while unsure:  # cut, but the prefix does not yet prove the text exceeds the window
        for i in unsure:
            max_chars[i] = widened(max_chars[i], read[i], window)
            capped[i] = cap_text(texts[i], int(max_chars[i]))
        tokenize(unsure)
        unsure = [i for i in unsure if len(capped[i]) < len(texts[i]) and read[i] <= window]
    return FirstWindows(ids, read, np.array([len(c) for c in capped], dtype=np.int64), window)


def widened(max_chars: int, read: int, window: int) -> int:
    """The next prefix length for a text whose ``max_chars`` prefix gave ``read`` tokens, not more than
    ``window``: enough for the window at the prefix's own characters per token, with a quarter to spare,
    and at least twice the last (x8 when the prefix held no token at all: whitespace only)."""
    if read == 0:
        return 8 * max_chars
    return max(2 * max_chars, -(-5 * max_chars * (window + 1) // (4 * read)))


def dropped_tokens(texts: list[str], firsts: FirstWindows, count) -> dict[int, int]:
    """{index: tokens past the window} for each truncated text: the prefix's tokens beyond the window
    plus every token of the rest of the text, counted in pieces (``full_lengths``) so a multi-megabyte
    text never reaches the tokenizer whole. ``count(texts)`` counts tokens without special tokens."""
    cut = np.flatnonzero(firsts.truncated)
    rest = full_lengths([texts[i][firsts.read_chars[i]:] for i in cut], count)
    return dict(zip(cut.tolist(), (firsts.read[cut] - firsts.window + rest).tolist()))


def estimated_dropped(texts: list[str], firsts: FirstWindows) -> dict[int, int]:
    """{index: tokens past the window} for each truncated text, as ``dropped_tokens`` but with the rest
    of the text (after the prefix read) counted from its characters at the prefix's own characters per
    token, so that nothing past the prefix is tokenized. A truncated text's prefix holds more tokens than
    the window, so the rate is never taken from an empty prefix."""
    cut = np.flatnonzero(firsts.truncated)
    rest = np.array([len(texts[i]) for i in cut], dtype=np.int64) - firsts.read_chars[cut]
    estimate = np.rint(rest * firsts.read[cut] / firsts.read_chars[cut]).astype(np.int64)
    return dict(zip(cut.tolist(), (firsts.read[cut] - firsts.window + estimate).tolist()))
