"""Vectors: the output's embedding dtype (``--output-dtype``), with sentence-transformers' semantics.

``float32`` (the model's own values), ``float16``, and the quantized forms of sentence-transformers'
``quantize_embeddings``: ``int8`` and ``uint8`` (each dimension cut into 256 buckets between its
calibration minimum and maximum, values outside clipped), ``binary`` and ``ubinary`` (one bit per
dimension, set where the value is above 0, packed eight to a byte; ``binary`` shifted by -128 into int8).

int8 and uint8 need calibration ranges that every part of an output shares, so that vectors (and the
queries later compared with them) are bucketed alike: the first unit committed pins them from its own
vectors (``UnitStore.quantization_ranges``), and the manifest carries them for quantizing queries.
"""

from __future__ import annotations

import base64

import numpy as np
import pyarrow as pa

OUTPUT_DTYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")
_ARROW = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "uint8": pa.uint8(),
          "binary": pa.int8(), "ubinary": pa.uint8()}


def pack(vector: np.ndarray | None) -> str | None:
    """A vector as JSON records keep it (canaries, mean vectors): base64 of its float32 bytes; None stays None."""
    return None if vector is None else base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()


def unpack(text: str | None) -> np.ndarray | None:
    """``pack``'s float32 vector back; None stays None."""
    return None if text is None else np.frombuffer(base64.b64decode(text), "<f4")


def width(dtype: str, dim: int) -> int:
    """Values per stored vector: one per dimension, or one byte per eight for the binary forms."""
    return (dim + 7) // 8 if dtype.endswith("binary") else dim


def arrow_type(dtype: str, dim: int) -> pa.DataType:
    return pa.list_(_ARROW[dtype], width(dtype, dim))


def calibration(vectors: np.ndarray) -> np.ndarray:
    """Per-dimension [min, max] of ``vectors``: a (2, dim) array, as sentence-transformers computes it."""
    return np.vstack((vectors.min(axis=0), vectors.max(axis=0))).astype(np.float32)


def quantize(vectors: np.ndarray, dtype: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """``vectors`` (float32, rows) in ``dtype``; ``ranges`` (from ``calibration``) for int8 and uint8."""
    if dtype == "float32":
        return vectors.astype(np.float32, copy=False)
    if dtype == "float16":
        return vectors.astype(np.float16)
    if dtype in CALIBRATED:
        starts = ranges[0]
        steps = (ranges[1] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if dtype == "uint8" else (buckets - 128).astype(np.int8)
    packed = np.packbits(vectors > 0, axis=-1)
    return (packed - 128).astype(np.int8) if dtype == "binary" else packed


def dequantize(values: np.ndarray, dtype: str, ranges: np.ndarray) -> np.ndarray:
    """int8 or uint8 values back to float32, each at its bucket's centre: within half a bucket of the
    value quantized (when it lay inside the calibration). For readers of an ``--output-dtype int8``
    or ``uint8`` output.

    Args:
        values: an (n, dim) array of the ``embedding`` column's values.
        dtype: the output's ``output_dtype`` ("int8" or "uint8", from ``_manifest.json``).
        ranges: the (2, dim) calibration, ``_quantization.json``'s ``ranges`` (also in the manifest).
    """
    starts = ranges[0]
    steps = np.where(ranges[1] == starts, 1, (ranges[1] - starts) / 255)
    buckets = values.astype(np.float32) + (128 if dtype == "int8" else 0)
    return (starts + (buckets + 0.5) * steps).astype(np.float32)


def column(vectors: np.ndarray, dtype: str, dim: int, ranges: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """The output's ``embedding`` column: a fixed-size list per row in ``dtype``."""
    values = quantize(vectors, dtype, ranges)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), _ARROW[dtype]), width(dtype, dim))
