"""Planning: input expansion, schema checks, row-group-aligned units with content-derived ids."""

import pytest

from docembed.pipeline.plan import InputFile, Plan, expand_input, plan_input, plan_ranges, split_done
from tests.conftest import write_docs
from docembed.errors import InputError, OutputError
from docembed.records import WorkUnit

pytestmark = pytest.mark.unit

COLUMNS = {"id": "id", "text": "text"}


def test_units_gather_whole_row_groups_up_to_the_target():
    assert plan_ranges((50, 50, 50, 50, 20), 100) == [(0, 100, (0, 1)), (100, 200, (2, 3)), (200, 220, (4,))]


def test_a_row_group_much_larger_than_the_target_is_split_by_rows():
    assert plan_ranges((30, 500, 30), 200) == [
        (0, 30, (0,)), (30, 196, (1,)), (196, 363, (1,)), (363, 530, (1,)), (530, 560, (2,)),
    ]


def test_empty_files_and_row_groups_give_no_rows_to_plan():
    assert plan_ranges((), 100) == []
    assert plan_ranges((0, 0), 100) == []


def test_unit_ids_are_stable_and_change_with_file_identity_or_range():
    unit = WorkUnit("s3://b/a.parquet", "etag:1", 0, 100, (0,))
    assert unit.unit_id == WorkUnit("s3://b/a.parquet", "etag:1", 0, 100, (0, 1)).unit_id
    assert unit.unit_id != WorkUnit("s3://b/a.parquet", "etag:2", 0, 100, (0,)).unit_id
    assert unit.unit_id != WorkUnit("s3://b/a.parquet", "etag:1", 0, 99, (0,)).unit_id


def test_expand_a_file_a_folder_and_a_glob(tmp_path):
    for name in ("a.parquet", "sub/b.parquet", "_skip/c.parquet", ".hidden.parquet"):
        write_docs(tmp_path / name, ["1"], ["x y"])
    root = str(tmp_path)
    assert expand_input(f"{root}/a.parquet") == [f"{root}/a.parquet"]
    assert expand_input(root) == [f"{root}/a.parquet", f"{root}/sub/b.parquet"]
    assert expand_input(f"{root}/*.parquet") == [f"{root}/a.parquet"]


def test_an_input_that_matches_nothing_is_an_error_before_any_work(tmp_path):
    with pytest.raises(InputError, match="matched no files"):
        expand_input(f"{tmp_path}/*.parquet")
    with pytest.raises(InputError, match="no such file or folder"):
        expand_input(f"{tmp_path}/missing.parquet")


def test_a_missing_column_lists_the_columns_found(tmp_path):
    write_docs(tmp_path / "a.parquet", ["1"], ["x"])
    with pytest.raises(InputError, match=r"no text column 'body'; columns found: id, text"):
        plan_input(str(tmp_path), {"id": "id", "text": "body"}, 10)


def test_a_numeric_text_column_is_an_error_naming_its_type(tmp_path):
    write_docs(tmp_path / "a.parquet", ["1"], [1.5])
    with pytest.raises(InputError, match="text column 'text' has type double"):
        plan_input(str(tmp_path), COLUMNS, 10)


def test_plan_over_files_counts_every_row(tmp_path):
    write_docs(tmp_path / "a.parquet", [str(i) for i in range(120)], ["t"] * 120, row_group_size=40)
    write_docs(tmp_path / "b.parquet", [], [], row_group_size=40)
    plan = plan_input(str(tmp_path), COLUMNS, 50)
    assert plan.rows == 120
    assert [(u.row_start, u.row_end) for u in plan.units] == [(0, 80), (80, 120)]


def _marker(unit, **changes):
    return {**unit.to_json(), **changes}


def test_split_done_skips_committed_units_and_refuses_moved_boundaries():
    file = InputFile("f.parquet", 10, "mtime:1", 200, (100, 100))
    units = (WorkUnit("f.parquet", "mtime:1", 0, 100, (0,)), WorkUnit("f.parquet", "mtime:1", 100, 200, (1,)))
    plan = Plan((file,), units)
    todo, done, _ = split_done(plan, {units[0].unit_id: _marker(units[0])})
    assert (todo, done) == ([units[1]], [units[0]])
    moved = WorkUnit("f.parquet", "mtime:1", 0, 150, (0, 1))
    with pytest.raises(OutputError, match="--checkpoint-every"):
        split_done(plan, {moved.unit_id: _marker(moved)})


def test_split_done_supersedes_the_units_of_a_file_that_changed():
    file = InputFile("f.parquet", 10, "mtime:2", 100, (100,))
    old = WorkUnit("f.parquet", "mtime:1", 0, 50, (0,))
    new = WorkUnit("f.parquet", "mtime:2", 0, 100, (0,))
    todo, done, superseded = split_done(Plan((file,), (new,)), {old.unit_id: _marker(old)})
    assert (todo, done, [m["unit_id"] for m in superseded]) == ([new], [], [old.unit_id])
