"""Damaged bookkeeping on a finished output: `run`, `status` and `verify` agree on each case. A run
redoes what is damaged and says so in its summary, never printing success over missing rows;
`status` and `verify` name the same damage before that run and are clean after it."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from docembed.cli import main
from docembed.store.admin import OutputAdmin
from tests.conftest import read_output, write_docs

pytestmark = pytest.mark.e2e

FLAGS = ["--no-progress", "--checkpoint-every", "20"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, docs):
    """A finished output of 60 documents in 3 units, one row rejected (empty text), and a second
    finished output of the same input made with other settings (no normalisation)."""
    tmp = tmp_path_factory.mktemp("finished")
    ids, texts = docs
    texts = texts[:60]
    texts[5] = " "
    write_docs(tmp / "in.parquet", ids[:60], texts, row_group_size=20)
    for name, extra in (("out", []), ("other", ["--no-normalize"])):
        assert main(["run", "--input", str(tmp / "in.parquet"), "--output", str(tmp / name), *FLAGS, *extra]) == 0
    return tmp, ids[:60]


def _copy(finished, tmp_path):
    tmp, ids = finished
    shutil.copytree(tmp / "out", tmp_path / "out")
    return tmp_path / "out", tmp / "in.parquet", ids


def _unit_with_rejects(out):
    markers = OutputAdmin(str(out)).done_markers()
    return next(m for m in markers.values() if m["rejects"])


def _truncate_marker(out, tmp):
    marker = out / "_checkpoints" / f"{_unit_with_rejects(out)['unit_id']}.json"
    marker.write_bytes(marker.read_bytes()[: marker.stat().st_size // 2])
    return "cannot be read (JSONDecodeError"


def _delete_part(out, tmp):
    (out / _unit_with_rejects(out)["part"]).unlink()
    return "is gone"


def _delete_rejects(out, tmp):
    (out / _unit_with_rejects(out)["rejects"]).unlink()
    return "its rejections _rejects/"


def _foreign_part(out, tmp):
    """The part of the same unit from an output made with other settings, under the same name."""
    name = _unit_with_rejects(out)["part"]
    assert (tmp / "other" / name).stat().st_size != (out / name).stat().st_size
    shutil.copy(tmp / "other" / name, out / name)
    return "is not the file it committed"


CASES = {"truncated marker": _truncate_marker, "part gone": _delete_part, "rejects gone": _delete_rejects,
         "foreign part": _foreign_part}


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_unit_is_named_by_status_and_verify_and_redone_by_the_run(case, finished, tmp_path, capsys):
    out, inp, ids = _copy(finished, tmp_path)
    said = CASES[case](out, finished[0])
    assert main(["status", "--output", str(out)]) == 0
    status = capsys.readouterr().out
    assert "damaged    unit " in status and said in status and "the next run redoes it" in status
    assert main(["verify", "--output", str(out), "--input", str(inp)]) == 1
    verify = capsys.readouterr().out
    assert said in verify and "rerun to redo it" in verify

    assert main(["run", "--input", str(inp), "--output", str(out), *FLAGS]) == 0
    summary = capsys.readouterr().out
    assert "repaired   unit " in summary and said in summary and "redone by this run" in summary
    assert "1 committed this run, 2 already done" in summary
    assert "accounted  60 input rows = 59 embedded + 1 rejected" in summary
    got = read_output(out).column("id").to_pylist()
    assert sorted(got) == sorted(ids[:5] + ids[6:]) and len(got) == len(set(got))
    assert main(["verify", "--output", str(out), "--input", str(inp)]) == 0
    assert main(["status", "--output", str(out)]) == 0
    assert "damaged    " not in capsys.readouterr().out


def test_a_manifest_cut_in_half_is_an_error_for_status_and_verify_and_rewritten_by_the_run(finished, tmp_path,
                                                                                          capsys):
    out, inp, _ = _copy(finished, tmp_path)
    manifest = out / "_manifest.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    for command in (["status", "--output", str(out)], ["verify", "--output", str(out)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("docembed: error: ") and len(err.splitlines()) == 1
        assert "_manifest.json is damaged (JSONDecodeError" in err and "rerun the same `docembed run` command" in err
    assert main(["run", "--input", str(inp), "--output", str(out), *FLAGS]) == 0
    summary = capsys.readouterr().out
    assert "repaired   _manifest.json is damaged (JSONDecodeError" in summary and "this run rewrites it" in summary
    assert json.loads(manifest.read_text())["status"] == "complete"
    assert main(["verify", "--output", str(out), "--input", str(inp)]) == 0


def test_markers_and_parts_of_a_repaired_unit_match_an_untouched_output(finished, tmp_path, capsys):
    """The redone unit holds the same rows and vectors as before the damage."""
    out, inp, _ = _copy(finished, tmp_path)
    marker = _unit_with_rejects(out)
    before = pq.read_table(out / marker["part"]).select(["id", "embedding"])
    _delete_part(out, None)
    assert main(["run", "--input", str(inp), "--output", str(out), *FLAGS]) == 0
    after = pq.read_table(out / marker["part"]).select(["id", "embedding"])
    assert after.column("id").equals(before.column("id"))
    import numpy as np

    diff = np.abs(after.column("embedding").combine_chunks().flatten().to_numpy()
                  - before.column("embedding").combine_chunks().flatten().to_numpy())
    assert diff.max() < 1e-5


def test_an_input_file_deleted_between_runs_is_named_by_run_status_and_verify_and_pruned_only_when_asked(
        tmp_path, docs, capsys):
    ids, texts = docs
    inp, out = tmp_path / "in", tmp_path / "out"
    write_docs(inp / "day1.parquet", ids[:30], texts[:30])
    write_docs(inp / "day2.parquet", ids[30:50], texts[30:50])
    argv = ["run", "--input", str(inp), "--output", str(out), *FLAGS]
    assert main(argv) == 0
    (inp / "day1.parquet").unlink()
    (out / "part-foreign.parquet").write_bytes(b"not docembed's")
    assert main(argv) == 0
    said = f"{inp}/day1.parquet is gone since it was embedded: its 1 unit (30 rows)"
    summary = capsys.readouterr().out
    assert f"removed    {said} stay in the output; --prune-removed deletes them" in summary
    assert "cleaned    1 file without a done-marker removed" in summary and "part-foreign.parquet" in summary
    assert main(["status", "--output", str(out)]) == 0
    status = capsys.readouterr().out
    assert "documents  20/20 done (100.0%)" in status and f"elsewhere  {said} stay" in status
    assert main(["verify", "--output", str(out)]) == 0  # the output is whole; the note says what is in it
    assert f"note: {said} stay in the output" in capsys.readouterr().out
    assert main(["verify", "--output", str(out), "--input", str(inp)]) == 1
    assert "30 embedded ids are not in the input (or not once) (30 rows come from files no longer" in \
        capsys.readouterr().out

    assert main(argv + ["--prune-removed"]) == 0
    assert f"pruned     {said} were deleted (--prune-removed)" in capsys.readouterr().out
    assert sorted(read_output(out).column("id").to_pylist()) == sorted(ids[30:50])
    assert main(["verify", "--output", str(out), "--input", str(inp)]) == 0


def test_prune_removed_refuses_to_delete_every_unit(tmp_path, docs, capsys):
    """A mistyped --input, or all inputs moved elsewhere: pruning would erase the output, so it is refused."""
    ids, texts = docs
    inp, out = tmp_path / "in", tmp_path / "out"
    write_docs(inp / "day1.parquet", ids[:10], texts[:10])
    assert main(["run", "--input", str(inp), "--output", str(out), *FLAGS]) == 0
    (inp / "day1.parquet").unlink()
    write_docs(inp / "day2.parquet", ids[10:20], texts[10:20])
    assert main(["run", "--input", str(inp), "--output", str(out), *FLAGS, "--prune-removed"]) == 2
    assert "--prune-removed would delete every unit" in capsys.readouterr().err
    assert len(OutputAdmin(str(out)).done_markers()) == 1  # nothing was deleted
