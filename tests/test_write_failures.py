"""A write that fails mid-run: the run exits non-zero with the cause, no partial part is visible, and a
rerun after the cause is fixed completes with every document exactly once."""

import subprocess

import fsspec
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from docembed.cli import main
from tests.conftest import read_output, tmpfs, write_docs

pytestmark = pytest.mark.e2e


def _inputs(tmp_path, docs, count=120):
    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:count], texts[:count], row_group_size=10)
    return ids[:count]


def _argv(tmp_path, out):
    return ["run", "--input", str(tmp_path / "in.parquet"), "--output", str(out), "--checkpoint-every", "10",
            "--no-progress"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 160 KiB tmpfs, so writes fail with ENOSPC; skipped where mounting is not allowed."""
    yield from tmpfs(tmp_path, "160k")


def test_disk_full_midway_then_rerun_after_freeing_space(tmp_path, docs, small_disk, capsys):
    ids = _inputs(tmp_path, docs)
    out = small_disk / "out"
    assert main(_argv(tmp_path, out)) == 1
    err = capsys.readouterr().err
    assert "the job failed" in err and "No space left on device" in err and "rerun the same command" in err
    parts = sorted(out.glob("part-*.parquet"))
    assert 0 < len(parts) < 12  # it failed midway
    for part in parts:  # every visible part is whole
        assert pq.read_table(part).num_rows == 10
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # "free space"
    assert main(_argv(tmp_path, out)) == 0
    got = read_output(out).column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))


class FlakyStore(MemoryFileSystem):
    """An object store (fsspec's in-memory one) whose PUTs start failing after ``budget`` objects, like
    a store returning 503s. Each PUT is whole or nothing, as on S3 or GCS."""

    protocol = ("flaky",)
    budget = None

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path[len("flaky://"):] if path.startswith("flaky://") else path)

    def pipe_file(self, path, value, **kwargs):
        if FlakyStore.budget is not None:
            if FlakyStore.budget <= 0:
                raise OSError(f"simulated object-store error: 503 SlowDown on PUT {path}")
            FlakyStore.budget -= 1
        return super().pipe_file(path, value, **kwargs)


@pytest.fixture
def flaky_store():
    fsspec.register_implementation("flaky", FlakyStore, clobber=True)
    FlakyStore.budget = 9  # manifest, probe, then a few parts and markers
    yield FlakyStore
    FlakyStore.budget = None
    FlakyStore().rm("/flaky-bucket", recursive=True)


def test_object_store_error_midway_then_rerun_after_it_recovers(tmp_path, docs, flaky_store, capsys):
    ids = _inputs(tmp_path, docs)
    out = "flaky://flaky-bucket/out"
    assert main(_argv(tmp_path, out)) == 1
    assert "simulated object-store error: 503 SlowDown" in capsys.readouterr().err
    fs = flaky_store()
    parts = [p for p in fs.ls("/flaky-bucket/out", detail=False) if "/part-" in p]
    assert 0 < len(parts) < 12
    for part in parts:
        with fs.open(part, "rb") as handle:
            assert pq.read_table(handle).num_rows == 10
    flaky_store.budget = None  # the store recovers
    assert main(_argv(tmp_path, out)) == 0
    got = ds.dataset("/flaky-bucket/out", format="parquet", filesystem=fs).to_table().column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
