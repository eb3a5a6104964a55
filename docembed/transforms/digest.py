"""Digest: a short hash of a unit's input texts, so that vectors can be checked against the text they stand for.

A worker hashes the text column of its unit's row range as read from Parquet (every row, rejected
ones included, nulls told apart from empty texts) and the done-marker keeps it (``text_digest``).
``docembed verify --input`` reads the same rows again and compares: a file rewritten in place with
other texts (even at the same size and modification time) shows as units whose texts changed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PREFIX = "blake2b:"
MAGIC = b"PAR1"


def texts_digest(texts: pa.Array | pa.ChunkedArray) -> str:
    """``blake2b:<hex>`` of the values, in order: their bytes (strings as UTF-8), their lengths and
    which are null. Computed on Arrow's buffers, without a Python object per text."""
    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    binary = pc.cast(texts, pa.large_binary())
    if binary.null_count == len(binary):  # an all-null column may come without buffers
        offsets, data = np.zeros(len(binary) + 1, np.int64), b""
    else:
        offsets = np.frombuffer(binary.buffers()[1], np.int64)[binary.offset:binary.offset + len(binary) + 1]
        buffer = binary.buffers()[2]
        data = b"" if buffer is None else memoryview(buffer)[offsets[0]:offsets[-1]]
        offsets = offsets - offsets[0]
    valid = np.asarray(binary.is_valid().to_numpy(zero_copy_only=False), dtype=np.uint8)
    digest = hashlib.blake2b(digest_size=16)
    for piece in (np.int64(len(binary)).tobytes(), offsets.astype(np.int64).tobytes(), valid.tobytes(), data):
        digest.update(piece)
    return PREFIX + digest.hexdigest()


def footer_digest(handle) -> str:
    """A digest of an open Parquet file's footer (its metadata: schema, row groups, each column
    chunk's offsets, sizes and statistics), read from the file's end; "" when it has no footer."""
    handle.seek(-8, 2)
    tail = handle.read(8)
    length = int.from_bytes(tail[:4], "little")
    if len(tail) < 8 or tail[4:] != MAGIC:
        return ""
    handle.seek(-8 - length, 2)
    return hashlib.blake2b(handle.read(length), digest_size=16).hexdigest()
