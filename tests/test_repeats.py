"""Repeated ids against the output as the run was planned: a row rejected as ``duplicate_id`` must
repeat an id the output holds. One whose first occurrence is gone (lost) is named by ``verify``,
refused by ``run`` with the same rows named, and embedded by ``--retry-rejects duplicate_id``; a run
that takes units back (a changed or pruned file) judges the output's repeats again by itself."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from docembed.cli import main
from docembed.store.admin import OutputAdmin
from tests.conftest import read_output, write_docs

pytestmark = pytest.mark.e2e

FLAGS = ["--checkpoint-every", "10", "--no-progress", "--on-duplicate-id", "keep-first"]


@pytest.fixture
def repeated(tmp_path, docs, tiny_model):
    """a.parquet holds ids 0-9; b.parquet holds 10-19, its row 3 repeating a's id 4."""
    ids, texts = docs
    ids, texts = list(ids[:20]), list(texts[:20])
    write_docs(tmp_path / "in" / "a.parquet", ids[:10], texts[:10], row_group_size=10)
    b_ids = ids[10:]
    b_ids[3] = ids[4]
    write_docs(tmp_path / "in" / "b.parquet", b_ids, texts[10:], row_group_size=10)
    argv = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", tiny_model, *FLAGS]
    assert main(argv) == 0
    return tmp_path, argv, ids


def _rejected(out) -> list[tuple[str, int, str]]:
    admin = OutputAdmin(str(out))
    table = admin.read_rejects(admin.done_markers())
    return sorted(zip(*(table.column(c).to_pylist() for c in ("source", "row_index", "reason"))))


def test_a_pruned_first_occurrence_hands_its_id_to_the_rejected_repeat(repeated, capsys):
    tmp, argv, ids = repeated
    assert [r[1:] for r in _rejected(tmp / "out")] == [(3, "duplicate_id")]
    os.remove(tmp / "in" / "a.parquet")
    capsys.readouterr()
    assert main(argv + ["--prune-removed"]) == 0
    printed = capsys.readouterr().out
    assert "retried    1 rejected row (duplicate_id) of 1 unit: 1 embedded" in printed
    got = read_output(tmp / "out").column("id").to_pylist()
    assert sorted(got) == sorted(ids[10:13] + [ids[4]] + ids[14:])  # b's row 3 now holds id 4
    assert _rejected(tmp / "out") == []
    assert main(["verify", "--output", str(tmp / "out"), "--input", str(tmp / "in"), "--no-canaries"]) == 0


def test_a_lost_repeat_is_named_by_verify_refused_by_run_and_embedded_on_retry(repeated, docs, capsys):
    """a's unit taken out behind docembed's back (its marker and part deleted, its file moved out of the
    input): b's rejected row 3 now repeats an id that no part holds."""
    tmp, argv, ids = repeated
    admin = OutputAdmin(str(tmp / "out"))
    (marker,) = [m for m in admin.done_markers().values() if m["source"].endswith("a.parquet")]
    admin.remove_unit(marker)
    os.rename(tmp / "in" / "a.parquet", tmp / "a.parquet")
    capsys.readouterr()
    assert main(["verify", "--output", str(tmp / "out"), "--no-canaries"]) == 1
    printed = capsys.readouterr().out
    lost = f"id {ids[4]!r} at {tmp / 'in' / 'b.parquet'} row 3"
    assert "1 row rejected as duplicate_id has no row with its id in the output" in printed and lost in printed

    write_docs(tmp / "in" / "c.parquet", ["new-1", "new-2"], list(docs[1][30:32]))  # work for the run to do
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "1 row rejected as duplicate_id by an earlier run has no row with its id in the output" in err
    assert lost in err and "--retry-rejects duplicate_id" in err
    assert not any("new-" in i for i in read_output(tmp / "out").column("id").to_pylist())  # refused before any

    assert main(argv + ["--retry-rejects", "duplicate_id"]) == 0
    got = read_output(tmp / "out").column("id").to_pylist()
    assert sorted(got) == sorted(ids[10:13] + [ids[4]] + ids[14:] + ["new-1", "new-2"])
    assert main(["verify", "--output", str(tmp / "out"), "--input", str(tmp / "in"), "--no-canaries"]) == 0


def test_verify_names_a_part_no_marker_claims(repeated, capsys):
    tmp, _, _ = repeated
    admin = OutputAdmin(str(tmp / "out"))
    name = sorted(admin.part_files())[0]
    pq.write_table(pq.read_table(tmp / "out" / name), tmp / "out" / "part-leftover.parquet")
    capsys.readouterr()
    assert main(["verify", "--output", str(tmp / "out"), "--no-canaries"]) == 1
    printed = capsys.readouterr().out
    assert "part part-leftover.parquet is claimed by no done-marker" in printed
    assert "part part-leftover.parquet is present but not listed" not in printed  # one message per part


def test_the_duplicate_id_job_and_the_local_check_write_the_same_repeats(repeated, docs):
    """The Beam job clusters run and the check local runners do in the launcher's process, in one pass
    or in several hash buckets, find the same repeats: against the output as planned, across files and
    within a unit."""
    import apache_beam as beam
    from apache_beam.runners.direct.direct_runner import DirectRunner

    from docembed.pipeline.graph import build_dedup_graph
    from docembed.pipeline.execute import run_graph
    from docembed.pipeline.run import before_job, prepare
    from docembed.transforms.dedup import find_here

    tmp, argv, ids = repeated
    write_docs(tmp / "in" / "c.parquet", [ids[0], "n1", "n1", "n2"], list(docs[1][30:34]))
    options, opts, output, plan, settings = prepare(argv[1:])
    job = before_job(opts, output, plan, settings)
    (unit,) = job.resume.todo

    def found() -> dict:
        got = output.read_repeats(settings.run_id, unit.unit_id)
        output.remove(f"_plans/{settings.run_id}/repeats/{unit.unit_id}.json")
        return got

    run_graph(beam.Pipeline(runner=DirectRunner()), job.plan, job.settings, build=build_dedup_graph)
    by_job = found()
    find_here(*job.plan.records, job.settings)
    in_one_pass = found()
    find_here(*job.plan.records, job.settings, ids_per_pass=3)  # 24 ids and output rows: 8 passes
    assert by_job == in_one_pass == found() == {
        0: f"id {ids[0]!r} at {tmp / 'in' / 'c.parquet'} row 0 is already in the output",
        2: f"id 'n1' at {tmp / 'in' / 'c.parquet'} row 2 repeats {tmp / 'in' / 'c.parquet'} row 1"}
