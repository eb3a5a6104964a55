"""Checkpoint state: atomic publishing, done-markers, and cleanup of interrupted attempts."""

import pyarrow as pa
import pytest

from docembed.store.admin import OutputAdmin
from docembed.store.layout import part_name

pytestmark = pytest.mark.unit


def test_publish_leaves_no_scratch_and_replaces_whole(tmp_path):
    out = OutputAdmin(str(tmp_path / "out"))
    out.publish("part-a.parquet", b"one")
    out.publish("part-a.parquet", b"two")
    assert (tmp_path / "out" / "part-a.parquet").read_bytes() == b"two"
    assert list((tmp_path / "out" / "_attempts").iterdir()) == []


def test_markers_are_the_record_of_done_units(tmp_path):
    out = OutputAdmin(str(tmp_path))
    out.write_progress("u1", 5, 10)
    assert set(out.progress()) == {"u1"}
    out.mark_done("u1", {"unit_id": "u1", "rows": 10})
    assert out.done_ids() == {"u1"} and out.is_done("u1") and not out.is_done("u2")
    assert out.done_markers() == {"u1": {"unit_id": "u1", "rows": 10}}
    assert out.progress() == {}  # a finished unit's progress record is gone


def test_clean_leftovers_removes_scratch_progress_and_unmarked_parts(tmp_path):
    out = OutputAdmin(str(tmp_path))
    out.write_part("done", b"x")
    out.write_part("orphan", b"x")
    out.publish("_rejects/orphan.parquet", b"x")
    out.mark_done("done", {"unit_id": "done", "part": part_name("done")})
    out.write_progress("orphan", 3, 10)
    (tmp_path / "_attempts" / "part-orphan.parquet.123").write_bytes(b"partial")
    out.clean_leftovers(out.done_markers())
    assert out.part_files() == [part_name("done")]
    assert not list((tmp_path / "_attempts").iterdir())
    assert not (tmp_path / "_rejects" / "orphan.parquet").exists()
    assert out.progress() == {}


def test_memory_filesystem_works_the_same(tmp_path):
    out = OutputAdmin("memory://docembed-test/out")
    out.write_part("u", pa.py_buffer(b"abc").to_pybytes())
    out.mark_done("u", {"unit_id": "u"})
    assert out.part_files() == [part_name("u")] and out.done_ids() == {"u"}
    out.remove_all()
    assert not out.exists()
