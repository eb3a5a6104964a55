"""verify: a clean dataset passes; deleted, duplicated and foreign parts are each reported."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from docembed.cli import main
from docembed.pipeline.run import run
from tests.conftest import write_docs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, docs):
    tmp = tmp_path_factory.mktemp("verify")
    ids, texts = docs
    write_docs(tmp / "in" / "a.parquet", ids[:60] + [None], texts[:60] + ["no id"], row_group_size=20)
    run(["--input", str(tmp / "in"), "--output", str(tmp / "out"), "--checkpoint-every", "20", "--no-progress"])
    return tmp


def _verify(capsys, out, inp=None):
    code = main(["verify", "--output", str(out)] + (["--input", str(inp)] if inp else []))
    return code, capsys.readouterr().out


def _damaged(dataset, tmp_path):
    shutil.copytree(dataset / "out", tmp_path / "out")
    # The parts holding rows (the last unit's, whose only row is rejected, holds none).
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    return tmp_path / "out", [p for p in parts if pq.read_metadata(p).num_rows]


def test_a_clean_dataset_passes(dataset, capsys):
    code, printed = _verify(capsys, dataset / "out", dataset / "in")
    assert code == 0, printed
    assert printed.splitlines()[0].endswith("60 rows in 4 parts, 1 rejected row: OK")  # the last unit: an empty part
    assert printed.splitlines()[1].startswith("  canaries: 19 re-embedded at cpu fp32")


def test_a_deleted_part_is_reported(dataset, tmp_path, capsys):
    out, parts = _damaged(dataset, tmp_path)
    parts[0].unlink()
    code, printed = _verify(capsys, out, dataset / "in")
    assert code == 1
    assert f"part {parts[0].name} is listed in the manifest but missing" in printed
    assert "rows in the listed parts, the manifest counts 60" in printed
    assert "input ids are neither embedded nor rejected" in printed


def test_a_duplicated_part_is_reported(dataset, tmp_path, capsys):
    out, parts = _damaged(dataset, tmp_path)
    shutil.copy(parts[0], out / "part-copy.parquet")
    code, printed = _verify(capsys, out, dataset / "in")
    assert code == 1
    assert "part part-copy.parquet is claimed by no done-marker" in printed
    assert "ids appear more than once" in printed
    assert "embedded ids are not in the input (or not once)" in printed


def test_a_foreign_part_with_another_dimension_is_reported(dataset, tmp_path, capsys):
    out, _ = _damaged(dataset, tmp_path)
    vectors = (np.ones((2, 8)) / np.sqrt(8)).astype(np.float32)
    foreign = pa.table({"id": ["f1", "f2"],
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8)})
    pq.write_table(foreign, out / "part-foreign.parquet")
    code, printed = _verify(capsys, out)
    assert code == 1
    assert "part part-foreign.parquet: its fingerprint differs from the manifest's" in printed
    assert "part part-foreign.parquet: embedding type fixed_size_list<element: float>[8], expected" in printed


def test_nan_and_non_unit_vectors_are_reported(dataset, tmp_path, capsys):
    out, parts = _damaged(dataset, tmp_path)
    table = pq.read_table(parts[0])
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 384).copy()
    vectors[0, 0], vectors[1] = np.nan, vectors[1] * 2
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 384)
    pq.write_table(table.set_column(1, "embedding", column), parts[0])
    code, printed = _verify(capsys, out)
    assert code == 1
    assert f"part {parts[0].name}: 1 embeddings hold NaN or inf" in printed
    assert f"part {parts[0].name}: 1 embeddings are not unit length" in printed
