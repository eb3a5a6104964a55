"""Compact output vectors (--output-dtype): sentence-transformers' quantize_embeddings semantics, one
calibration per output, kept in the manifest, and outputs that verify."""

import json

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from docembed.pipeline.run import run
from docembed.pipeline.admin.verify import verify
from tests.conftest import read_output, write_docs
from docembed.vectors import calibration, quantize

DOCS = 120


@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
@pytest.mark.unit
def test_quantization_is_sentence_transformers_own_including_values_outside_the_calibration(dtype):
    rng = np.random.default_rng(0)
    calibrated = rng.normal(size=(300, 37)).astype(np.float32)
    queries = 1.5 * rng.normal(size=(50, 37)).astype(np.float32)  # many beyond the calibration's range
    ranges = calibration(calibrated)
    expected = quantize_embeddings(queries, precision=dtype, ranges=ranges if dtype.endswith("int8") else None)
    got = quantize(queries, dtype, ranges)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, docs):
    """The same 120 documents, in three units, written as float32 and in each compact dtype."""
    tmp = tmp_path_factory.mktemp("vectors")
    ids, texts = docs
    write_docs(tmp / "in.parquet", ids[:DOCS], texts[:DOCS], row_group_size=40)
    found = {}
    for dtype in ("float32", "float16", "int8", "binary"):
        out = tmp / dtype
        run(["--input", str(tmp / "in.parquet"), "--output", str(out), "--checkpoint-every", "40",
             "--output-dtype", dtype, "--no-progress"])
        found[dtype] = out
    return tmp, found


def _by_id(out) -> dict:
    table = read_output(out)
    return dict(zip(table.column("id").to_pylist(), np.asarray(table.column("embedding").to_pylist())))


@pytest.mark.e2e
def test_each_dtype_stores_what_quantizing_the_float32_vectors_gives(outputs, docs):
    tmp, found = outputs
    ids = docs[0][:DOCS]
    exact = np.stack([_by_id(found["float32"])[i] for i in ids])
    manifest = json.loads((found["int8"] / "_manifest.json").read_text())
    ranges = np.asarray(manifest["quantization"]["ranges"], dtype=np.float32)
    assert manifest["fingerprint"]["output_dtype"] == "int8" and ranges.shape == (2, 384)
    assert json.loads((found["int8"] / "_quantization.json").read_text())["ranges"] == ranges.tolist()
    kinds = {dtype: read_output(out).schema.field("embedding").type for dtype, out in found.items()}
    assert {dtype: (str(k.value_type), k.list_size) for dtype, k in kinds.items()} == {
        "float32": ("float", 384), "float16": ("halffloat", 384), "int8": ("int8", 384), "binary": ("int8", 48)}
    half = np.stack([_by_id(found["float16"])[i] for i in ids])
    assert np.abs(half - exact).max() < 1e-3
    for dtype in ("int8", "binary"):
        stored = np.stack([_by_id(found[dtype])[i] for i in ids])
        expected = quantize_embeddings(exact, precision=dtype, ranges=ranges if dtype == "int8" else None)
        # The runs are separate processes whose floats differ in the last bits: a value within that of
        # a bucket's edge may fall on either side of it (or of 0, for a bit).
        assert stored.shape == expected.shape and np.mean(stored == expected) > 0.99, dtype
        if dtype == "int8":
            assert np.abs(stored.astype(int) - expected.astype(int)).max() <= 1
    # One calibration for the whole output: the first unit committed pinned it from its own vectors.
    units = [exact[k:k + 40] for k in range(0, DOCS, 40)]
    assert any(np.allclose(calibration(u), ranges, atol=1e-6) for u in units)


@pytest.mark.e2e
def test_compact_outputs_verify_and_are_smaller(outputs):
    tmp, found = outputs
    sizes = {dtype: sum(p.stat().st_size for p in out.glob("part-*.parquet")) for dtype, out in found.items()}
    for out in found.values():
        assert verify(str(out), str(tmp / "in.parquet")).problems == []
    assert sizes["binary"] < sizes["int8"] < sizes["float16"] < sizes["float32"]


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.unit
def test_decoding_with_the_ranges_lands_within_half_a_bucket(dtype):
    from docembed.vectors import dequantize

    vectors = np.random.default_rng(1).normal(size=(200, 16)).astype(np.float32)
    ranges = calibration(vectors)
    half_bucket = (ranges[1] - ranges[0]) / 255 / 2
    assert np.all(np.abs(dequantize(quantize(vectors, dtype, ranges), dtype, ranges) - vectors) <= half_bucket + 1e-6)
