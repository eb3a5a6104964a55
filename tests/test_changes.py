"""Truthful when things change between runs: an input rewritten in place at the same size and
modification time (on local disk and on S3) is embedded again; outputs that recorded identities the
earlier way still resume; --checkpoint-every may change for files not yet cut; the units of a run
that ended without a report are judged for drift by the next run; a precision this machine cannot
give is refused before any work."""

import collections
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from docembed.cli import main
from docembed.pipeline.admin.report import unjudged
from docembed.pipeline.run import run
from tests.conftest import BUCKET, REPO, by_id, cosine, read_output, write_docs
from docembed.store import faults, storage
from docembed.store.faults import CRASH_EXIT

FLAGS = ["--no-progress", "--checkpoint-every", "10"]


def _run(inp, out, *extra):
    return run(["--input", str(inp), "--output", str(out), *FLAGS, *extra])


def _write_fixed_size(path_or_handle, ids, texts):
    """Plain, uncompressed, without statistics: two files whose texts have the same byte lengths have
    the same size, as a rewrite that keeps the size would."""
    pq.write_table(pa.table({"id": ids, "text": texts}), path_or_handle, compression="NONE", use_dictionary=False,
                   write_statistics=False, row_group_size=10)


def _swapped(texts):
    return [t.swapcase() for t in texts]  # other texts, the same bytes long (ASCII)


def _ascii(ids, texts, n):
    pairs = [(i, t) for i, t in zip(ids, texts) if t.isascii() and t.swapcase() != t][:n]
    return [i for i, _ in pairs], [t for _, t in pairs]


@pytest.mark.e2e
def test_a_file_rewritten_in_place_at_the_same_size_and_mtime_is_embedded_again(tmp_path, docs, reference_model):
    ids, texts = _ascii(*docs, 30)
    inp, out = tmp_path / "in.parquet", tmp_path / "out"
    _write_fixed_size(inp, ids, texts)
    first = _run(inp, out)
    assert first["embedded"] == 30
    stat = os.stat(inp)
    changed = _swapped(texts)
    _write_fixed_size(inp, ids, changed)
    os.utime(inp, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p, rsync -t and tar -x leave it
    assert (os.stat(inp).st_size, os.stat(inp).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)

    again = _run(inp, out)
    assert (again["superseded_units"], again["embedded"], again["skipped"]) == (3, 30, 0)
    table = read_output(out)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    vectors, expected = by_id(table), reference_model.encode(changed, normalize_embeddings=True)
    assert min(cosine(vectors[i], e) for i, e in zip(ids, expected)) >= 0.9999
    assert _run(inp, out)["skipped"] == 30  # unchanged since: nothing to do


@pytest.mark.servers
def test_an_object_rewritten_at_the_same_size_on_s3_is_embedded_again(s3, docs):
    fs, _ = s3
    ids, texts = _ascii(*docs, 20)
    key = f"{BUCKET}/changes/in.parquet"
    for batch in (texts, _swapped(texts)):
        with fs.open(key, "wb") as handle:
            _write_fixed_size(handle, ids, batch)
        summary = _run(f"s3://{key}", f"s3://{BUCKET}/changes/out")
        assert summary["embedded"] == 20
    assert summary["superseded_units"] == 2
    assert _run(f"s3://{key}", f"s3://{BUCKET}/changes/out")["skipped"] == 20


@pytest.mark.e2e
def test_an_output_whose_markers_recorded_identities_the_earlier_way_resumes_without_redoing(
        tmp_path, docs, monkeypatch):
    ids, texts = docs
    inp, out = tmp_path / "in.parquet", tmp_path / "out"
    write_docs(inp, ids[:30], texts[:30], row_group_size=10)
    with monkeypatch.context() as earlier:  # as versions before the change time and footer were kept
        earlier.setattr(storage, "input_identity", lambda info, footer: storage.file_fingerprint(info))
        assert _run(inp, out)["units_committed"] == 3
    resumed = _run(inp, out)
    assert (resumed["units_committed"], resumed["skipped"], resumed["superseded_units"]) == (0, 30, 0)
    write_docs(inp, ids[:20], texts[:20], row_group_size=10)  # a change the earlier record sees too
    changed = _run(inp, out)
    assert (changed["superseded_units"], changed["embedded"]) == (3, 20)


@pytest.mark.e2e
def test_checkpoint_every_may_change_for_files_not_yet_cut(tmp_path, docs, monkeypatch):
    ids, texts = docs
    inp, out = tmp_path / "in", tmp_path / "out"
    write_docs(inp / "day1.parquet", ids[:30], texts[:30], row_group_size=10)
    monkeypatch.setattr(faults, "_passed", collections.Counter())  # passages count per process: from here
    monkeypatch.setenv("DOCEMBED_FAULT", "publish:marker@2:raise")  # the run fails after its first unit
    assert main(["run", "--input", str(inp), "--output", str(out), *FLAGS]) == 1
    monkeypatch.delenv("DOCEMBED_FAULT")
    write_docs(inp / "day2.parquet", ids[30:70], texts[30:70], row_group_size=10)

    summary = run(["--input", str(inp), "--output", str(out), "--no-progress", "--checkpoint-every", "20"])
    # day1 keeps its cut of 10 (one unit done, two to do); day2 is cut at 20.
    assert (summary["units_skipped"], summary["units_committed"], summary["embedded"]) == (1, 4, 60)
    table = read_output(out)
    assert sorted(table.column("id").to_pylist()) == sorted(ids[:70])
    markers = [m for m in storage_markers(out)]
    assert sorted((m["source"].rsplit("/", 1)[1], m["row_end"] - m["row_start"]) for m in markers) == [
        ("day1.parquet", 10)] * 3 + [("day2.parquet", 20)] * 2
    assert run(["--input", str(inp), "--output", str(out), "--no-progress", "--checkpoint-every", "7"])[
        "skipped"] == 70


def storage_markers(out):
    import json

    return [json.loads(p.read_text()) for p in (out / "_checkpoints").glob("*.json")]


@pytest.mark.unit
def test_runs_that_ended_without_a_report_are_judged_once_by_the_next():
    markers = {"a": {"run_id": "r1"}, "b": {"run_id": "r2"}, "c": {"run_id": "r3"}, "d": {"run_id": "r4"}}
    reports = [{"run_id": "r1"}, {"run_id": "r3", "judged_runs": ["r2"]}]
    assert unjudged(markers, reports, "r5") == ["r4"]
    assert unjudged(markers, reports, "r4") == []


def _html(texts):
    import pydoc

    doc = pydoc.HTMLDoc()
    return [doc.page("doc", doc.markup(t, doc.preformat)) for t in texts]


@pytest.mark.e2e
def test_a_drifted_run_killed_before_its_report_is_flagged_by_the_next_run(tmp_path, docs, capsys):
    ids, texts = docs
    inp, out = tmp_path / "in", tmp_path / "out"
    write_docs(inp / "day1.parquet", ids[:60], texts[:60], row_group_size=10)
    assert main(["run", "--input", str(inp), "--output", str(out), *FLAGS, "--fail-on-drift"]) == 0
    write_docs(inp / "day2.parquet", ids[60:90], _html(texts[60:90]), row_group_size=10)
    # Killed once every unit is committed, as it writes its report.
    killed = subprocess.run([sys.executable, "-m", "docembed", "run", "--input", str(inp), "--output", str(out),
                             *FLAGS, "--fail-on-drift"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "DOCEMBED_FAULT": "publish:report@1"})
    assert killed.returncode == CRASH_EXIT, killed.stderr
    assert len(list((out / "_reports").glob("*.json"))) == 1
    capsys.readouterr()

    assert main(["run", "--input", str(inp), "--output", str(out), *FLAGS, "--fail-on-drift"]) == 3
    printed = capsys.readouterr().out
    assert "FLAGGED" in printed and "include 3 units committed by run" in printed
    # Judged once: the run after does not judge them again, and passes.
    assert main(["run", "--input", str(inp), "--output", str(out), *FLAGS, "--fail-on-drift"]) == 0
    assert len(list((out / "_reports").glob("*.json"))) == 2  # day 1's, and the run that judged day 2


@pytest.mark.unit
def test_fp16_on_a_local_machine_without_cuda_is_refused_before_any_work(tmp_path, docs, capsys):
    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:10], texts[:10])
    code = main(["run", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--precision",
                 "fp16", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("docembed: error:") == 1 and "fp16 runs on CUDA only" in err
    assert not (tmp_path / "out").exists()
