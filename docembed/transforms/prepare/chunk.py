"""Chunk: cut whole documents into model-sized token windows with exact character offsets (pure).

Used by ``--long-docs mean`` and ``--long-docs chunks``. A document is tokenized once, without
special tokens, in pieces of at most ``PIECE_CHARS`` characters cut just before whitespace (every
tokenizer docembed supports splits words there, so the pieces' tokens are exactly the whole text's,
and a 5 MB cell never sits in the tokenizer at once). Its tokens are then cut into windows of
``size`` tokens (the model's window less its special and prefix tokens), each starting ``overlap``
tokens before the previous one ended. With ``boundary="sentence"`` a window ends, where it can,
at the last paragraph end, else the last sentence end, among its last ``lookback`` tokens: the
same text and settings always give the same windows.

A window is fed to the model as token ids (special tokens added by the tokenizer), never re-tokenized
from its text, so what the model sees is exactly ``text[char_start:char_end]``'s tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from docembed.transforms.prepare.tokens import piece_batches
from docembed.records import ChunkSpec

SENTENCE_ENDS = np.array([ord(c) for c in ".!?"], dtype=np.uint32)
# How a window may end after a token: 2 at a paragraph end (a blank line follows), 1 at a sentence end.
PARAGRAPH, SENTENCE = 2, 1


@dataclasses.dataclass
class Tokens:
    """A document's tokens: ids and character offsets ``[starts[i], ends[i])`` into its text."""

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass
class Windows:
    """Every window of a unit's documents, one entry per window, in document then chunk order.

    ``weights`` are the tokens each window adds to its document that its predecessor did not
    already hold, so overlap tokens count once when windows are averaged into one vector.
    """

    doc: np.ndarray
    chunk: np.ndarray
    token_start: np.ndarray
    token_end: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.doc)


def tokenize(texts: list[str], encode) -> list[Tokens]:
    """Tokens of each text, in pieces. ``encode(pieces)`` returns, per piece, (ids, offsets) without
    special tokens (the Embedder's ``encode_with_offsets``)."""
    parts: list[list[tuple]] = [[] for _ in texts]
    for batch in piece_batches(texts):
        for (doc, a, b), (ids, offsets) in zip(batch, encode([texts[d][x:y] for d, x, y in batch])):
            # int32: 12 bytes a token held for the unit's whole model loop (ids and offsets fit easily)
            offsets = np.asarray(offsets, dtype=np.int32).reshape(-1, 2) + np.int32(a)
            parts[doc].append((np.asarray(ids, dtype=np.int32), offsets[:, 0], offsets[:, 1]))
    return [_joined(p) for p in parts]


def _joined(parts: list[tuple]) -> Tokens:
    if not parts:
        empty = np.zeros(0, dtype=np.int32)
        return Tokens(empty, empty, empty)
    return Tokens(*(np.concatenate([p[k] for p in parts]) for k in range(3)))


def window_bounds(n: int, spec: ChunkSpec, priority: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` covering ``n`` tokens; a text without tokens gets one empty window.

    ``priority[j]`` says how good a place the end of token j is to end a window (``PARAGRAPH``,
    ``SENTENCE`` or 0); without it, every window but the last holds exactly ``spec.size`` tokens.
    """
    bounds, start = [], 0
    while n - start > spec.size:
        end = start + spec.size
        if priority is not None and spec.lookback:
            lo = max(end - spec.lookback, start + spec.overlap + 1)  # keep every window advancing
            candidates = priority[lo - 1:end - 1]  # ending after token j gives end j + 1
            best = candidates.max(initial=0)
            if best > 0:
                end = lo + int(np.flatnonzero(candidates == best)[-1])
        bounds.append((start, end))
        start = end - spec.overlap
    bounds.append((start, n))
    return bounds


def boundary_priority(text: str, tokens: Tokens) -> np.ndarray:
    """For each token, ``PARAGRAPH`` if a blank line follows it, ``SENTENCE`` if it ends with
    . ! or ? and whitespace follows, else 0."""
    n = len(tokens)
    priority = np.zeros(n, dtype=np.int8)
    if n < 2:
        return priority
    gap_start, gap_end = tokens.ends[:-1], tokens.starts[1:]
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one entry per character
    newlines = np.concatenate([[0], np.cumsum(codes == 10)])
    blank_line = newlines[gap_end] - newlines[gap_start] >= 2
    sentence = np.isin(codes[np.maximum(gap_start - 1, 0)], SENTENCE_ENDS) & (gap_end > gap_start)
    priority[:-1] = np.where(blank_line, PARAGRAPH, np.where(sentence, SENTENCE, 0))
    return priority


def plan_windows(texts: list[str], tokens: list[Tokens], spec: ChunkSpec) -> Windows:
    """Every window of every document, with its character span and its weight in a mean."""
    rows = []
    for doc, (text, toks) in enumerate(zip(texts, tokens)):
        n = len(toks)
        priority = boundary_priority(text, toks) if spec.boundary == "sentence" and n > spec.size else None
        previous_end = 0
        for k, (a, b) in enumerate(window_bounds(n, spec, priority)):
            chars = (int(toks.starts[a]), int(toks.ends[b - 1])) if b > a else (0, 0)
            rows.append((doc, k, a, b, *chars, max(b - previous_end, 0)))
            previous_end = b
    columns = np.array(rows, dtype=np.int64).reshape(-1, 7).T
    return Windows(*columns)


def mean_by_document(vectors: np.ndarray, windows: Windows, docs: int, normalize: bool) -> np.ndarray:
    """One vector per document: its windows' vectors weighted by the new tokens each holds.

    A document of one window gets that window's vector unchanged (so ``mean`` equals ``truncate``
    for documents that fit); a document without tokens has one window of weight 0, kept as it is.
    """
    weights = np.where(windows.weights > 0, windows.weights, 0).astype(np.float64)
    single = np.bincount(windows.doc, minlength=docs) == 1
    weights[single[windows.doc]] = 1.0
    out = np.zeros((docs, vectors.shape[1]), dtype=np.float64)
    np.add.at(out, windows.doc, vectors.astype(np.float64) * weights[:, None])
    totals = np.bincount(windows.doc, weights=weights, minlength=docs)
    out /= np.where(totals > 0, totals, 1.0)[:, None]
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.where(norms > 0, norms, 1.0)
    return out.astype(np.float32)
