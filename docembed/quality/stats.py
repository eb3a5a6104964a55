"""Quality: statistics of a unit's input and vectors, small and mergeable across units, workers and runs.

Pure functions. A worker computes ``unit_stats`` for each unit it embeds and its done-marker carries
them; the launcher merges the markers of a run (``merge``) into the run report, and ``docembed.quality.drift``
compares a run's merged statistics with earlier runs'. Distributions are kept as log-spaced histograms
(``histogram``: bins 2^(1/16) apart, so a percentile read from one is within 2.2% of the exact value)
because those add up exactly across units, where percentiles do not.

What a unit's record holds (its marker's ``quality``):

- ``docs``: documents embedded; ``tokens``: the histogram of their text lengths in tokens (whole
  texts, special tokens excluded, so truncation does not hide a change in length);
- ``nonletter``: documents that are mostly not letters (``mostly_non_letters``: markup, base64, hex,
  tables of numbers);
- ``norms``: the histogram of vector norms before normalisation (one per vector the model made);
- ``vectors``, ``mean``, ``square``: how many vectors the output gets, their mean (base64 float32) and
  the mean of their squared norms, so that the mean direction of a run can be compared with earlier
  ones and the comparison's sampling noise estimated.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from docembed.vectors import pack, unpack

BINS_PER_DOUBLING = 16
ZERO = -10_000  # the bin of values <= 0
# Letters inside a run of this many non-space characters do not count as text: no word is that
# long, while base64, hex, minified code and markup joined by &nbsp; are.
LONG_RUN = 64
SCAN_CHARS = 4096  # a document's first characters are enough to tell text from markup
SCAN_BATCH = 2048  # documents scanned at once: small enough for the byte arrays to stay in cache


def histogram(values) -> dict[str, int]:
    """{bin: count} of ``values``; bin k holds [2^(k/16), 2^((k+1)/16)). Keys are strings (JSON)."""
    values = np.asarray(values, dtype=np.float64)
    positive = values > 0
    bins = np.full(values.shape, ZERO, dtype=np.int64)
    # The epsilon keeps exact powers of two (and so small integers) in their own bin despite rounding.
    bins[positive] = np.floor(np.log2(values[positive]) * BINS_PER_DOUBLING + 1e-9).astype(np.int64)
    keys, counts = np.unique(bins, return_counts=True)
    return {str(int(k)): int(c) for k, c in zip(keys, counts)}


def add_histograms(*hists: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for hist in hists:
        for key, count in hist.items():
            total[key] = total.get(key, 0) + count
    return total


def bin_value(key: str) -> float:
    """The value a bin stands for: the geometric middle of its range (0 for the zero bin)."""
    k = int(key)
    return 0.0 if k == ZERO else 2 ** ((k + 0.5) / BINS_PER_DOUBLING)


def percentile(hist: dict[str, int], q: float) -> float:
    """The ``q``-th percentile (0-100) of the values a histogram counts, to within its bin width."""
    keys = sorted(hist, key=int)
    total = sum(hist.values())
    if not total:
        return 0.0
    rank, seen = q / 100 * total, 0
    for key in keys:
        seen += hist[key]
        if seen >= rank:
            return bin_value(key)
    return bin_value(keys[-1])


def cdf_distance(a: dict[str, int], b: dict[str, int]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic of two histograms on the same bins: the largest
    gap between their cumulative shares (0: the same distribution, 1: no overlap)."""
    total_a, total_b = sum(a.values()), sum(b.values())
    if not total_a or not total_b:
        return 0.0
    gap, seen_a, seen_b = 0.0, 0, 0
    for key in sorted(set(a) | set(b), key=int):
        seen_a, seen_b = seen_a + a.get(key, 0), seen_b + b.get(key, 0)
        gap = max(gap, abs(seen_a / total_a - seen_b / total_b))
    return gap


def mostly_non_letters(texts: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per document: fewer than half of its visible characters are letters of ordinary words, read
    from its first 4,096 characters. Letters are ASCII letters and every non-ASCII character (other
    scripts); digits, punctuation and symbols are not; nor are letters inside a run of 64 or more
    printable ASCII characters without a space (base64, hex, minified code, markup joined by
    ``&nbsp;``: no word is that long). Works on the UTF-8 bytes with NumPy (about 70 MB/s on one
    core), a few percent of what tokenizing the same text costs."""
    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    found = [_non_letters(texts.slice(start, SCAN_BATCH)) for start in range(0, len(texts), SCAN_BATCH)]
    return np.concatenate(found) if found else np.zeros(0, dtype=bool)


def _non_letters(texts: pa.Array) -> np.ndarray:
    head = pc.cast(pc.utf8_slice_codeunits(texts, 0, SCAN_CHARS), pa.large_string())
    offsets = np.frombuffer(head.buffers()[1], np.int64)[head.offset:head.offset + len(head) + 1]
    data = head.buffers()[2]
    utf8 = np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    offsets = offsets - offsets[0]
    printable = (utf8 > 32) & (utf8 < 127)
    lead = utf8 >= 0xC0  # the first byte of a non-ASCII character (continuation bytes are 0x80-0xBF)
    lower = utf8 | 0x20
    letter = ((lower >= ord("a")) & (lower <= ord("z"))) | lead
    starts = offsets[:-1][offsets[:-1] < len(utf8)]
    cut = ~printable
    cut[starts] = True  # runs end at every non-printable byte and at each document's start
    run = np.cumsum(cut, dtype=np.int32)
    run_length = np.bincount(run[printable], minlength=int(run[-1]) + 1 if len(run) else 1)
    in_long_run = printable & (run_length[run] >= LONG_RUN)
    document = np.repeat(np.arange(len(offsets) - 1, dtype=np.int32), np.diff(offsets))
    words = np.bincount(document[letter & ~in_long_run], minlength=len(offsets) - 1)
    visible = np.bincount(document[printable | lead], minlength=len(offsets) - 1)
    return 2 * words < visible


def mean_vector(record: dict) -> np.ndarray | None:
    """A record's mean vector, in float64 for the arithmetic on it; None when it has none."""
    return None if not record.get("mean") else unpack(record["mean"]).astype(np.float64)


def unit_stats(doc_tokens: np.ndarray, nonletter: np.ndarray, norms: np.ndarray, vectors: np.ndarray) -> dict:
    """A unit's record (see the module's docstring) from its embedded documents' text lengths in
    tokens, their ``mostly_non_letters`` flags, the norms before normalisation of every vector the
    model made for them, and the vectors the output gets."""
    count = len(vectors)
    return {
        "docs": int(len(doc_tokens)),
        "tokens": histogram(doc_tokens),
        "nonletter": int(np.count_nonzero(nonletter)),
        "norms": histogram(norms),
        "vectors": count,
        # Accumulated in float64 without a float64 copy of the unit's vectors.
        "mean": pack(vectors.mean(axis=0, dtype=np.float64)) if count else None,
        "square": float(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64).mean()) if count else 0.0,
    }


def merge(records) -> dict:
    """Records of several units (or runs) as one: counts and histograms added, means weighted."""
    records = [r for r in records if r and "vectors" in r]  # markers written before statistics have none
    count = sum(r["vectors"] for r in records)
    weighted = [(r["vectors"], mean_vector(r)) for r in records if r["vectors"] and r.get("mean")]
    mean = sum(n * v for n, v in weighted) / count if weighted else None
    return {
        "docs": sum(r["docs"] for r in records),
        "tokens": add_histograms(*(r["tokens"] for r in records)),
        "nonletter": sum(r["nonletter"] for r in records),
        "norms": add_histograms(*(r["norms"] for r in records)),
        "vectors": count,
        "mean": pack(mean) if mean is not None else None,
        "square": sum(r["vectors"] * r["square"] for r in records) / count if count else 0.0,
    }


def mean_cosine(a: dict, b: dict) -> float | None:
    """Cosine between two records' mean vectors (None when either has none)."""
    if not a.get("mean") or not b.get("mean"):
        return None
    u, v = mean_vector(a), mean_vector(b)
    norms = np.linalg.norm(u) * np.linalg.norm(v)
    return float(u @ v / norms) if norms > 0 and u.shape == v.shape else None


def sampling_gap(a: dict, b: dict) -> float:
    """1 - cosine that two samples of these sizes from one distribution would show on average: the
    spread of the vectors around their mean, over twice the mean's squared length, times 1/n + 1/m."""
    if not a.get("vectors") or not b.get("vectors") or not b.get("mean"):
        return math.inf
    mean = mean_vector(b)
    length = float(mean @ mean)
    spread = max(0.0, b["square"] - length)
    return spread / (2 * length) * (1 / a["vectors"] + 1 / b["vectors"]) if length > 0 else math.inf
