"""Live and stopped runs as ``status``, ``verify`` and ``run --dry-run`` tell them, from the lock: "running"
only while a live lock holds the output; otherwise how the last run ended (interrupted, failed), with no
ETA; ``verify`` during a run checks what it has committed and finds no false problems. And ``verify
--input`` finds vectors whose input texts changed since they were embedded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from docembed.cli import main
from docembed.pipeline.lock import why_stale
from docembed.pipeline.run import run
from docembed.pipeline.admin.status import format_status, run_state, status
from docembed.pipeline.admin.verify import verify
from tests.conftest import REPO, by_id, read_output, wait_for, write_docs

UNITS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs):
    """40 documents in 4 units of 10."""
    tmp = tmp_path_factory.mktemp("states")
    ids, texts = docs
    write_docs(tmp / "in.parquet", ids[:10 * UNITS], texts[:10 * UNITS], row_group_size=10)
    return tmp


def _flags(corpus, model) -> list[str]:
    return ["--input", str(corpus / "in.parquet"), "--checkpoint-every", "10", "--no-progress", "--model", model]


@pytest.fixture(scope="module")
def reference(corpus, tiny_window_model, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "out"
    run([*_flags(corpus, tiny_window_model), "--output", str(out)])
    return by_id(read_output(out))


def _held_at(out, corpus, model, gate, fault: str) -> subprocess.Popen:
    """A run held by a fault gate at ``fault`` (``POINT@N:pause``), once it is there."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DOCEMBED_FAULT": fault, "DOCEMBED_FAULT_GATE": str(gate)}
    proc = subprocess.Popen([sys.executable, "-m", "docembed", "run", *_flags(corpus, model), "--output", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    passage = fault.split("@")[1].split(":")[0]
    wait_for(lambda: list(gate.parent.glob(f"{gate.name}.arrived.*.{passage}")), timeout=240, proc=proc,
             what=f"the run to be held at {fault.split(',')[0]}")
    return proc


def _said(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("docembed: error:")]


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def _check_exact(out, reference) -> None:
    got = by_id(read_output(out))
    assert sorted(got) == sorted(reference) and max(np.abs(got[i] - reference[i]).max() for i in reference) < 1e-6
    assert verify(str(out), canaries=False).problems == []


@pytest.mark.e2e
def test_a_live_run_then_a_sigterm_whose_stop_request_cannot_be_removed(corpus, tiny_window_model, reference,
                                                                         tmp_path, capsys):
    """Held after its second commit: status says running (host, pid, heartbeat) with an ETA, verify
    checks the 2 committed units and passes, the dry run says a run would exit 75. Then SIGTERM: the
    unit in hand finishes, the run stops, and its manifest says "interrupted"; removing the stop request
    fails (EROFS), which the one error line adds after the interruption, exit 143. Status then says
    interrupted, with no ETA; verify names it, and nothing else; the rerun is exact."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    env_fault = "published:marker@2:pause,remove:stop@2:errno=EROFS"  # remove:stop@1: the clean start's
    proc = _held_at(out, corpus, tiny_window_model, gate, env_fault)
    try:
        live = status(str(out))
        assert live["state"] == "running" and live["run"]["live"] and live["units_done"] == 2
        assert f"running: {socket.gethostname()} pid {proc.pid}, since " in format_status(live)
        assert "last heartbeat" in live["run"]["line"] and live["eta_s"] is not None
        during = verify(str(out), str(corpus / "in.parquet"), canaries=False)
        assert during.problems == [] and during.rows == 20 and during.parts == 2, during.problems
        assert any(n.startswith("a run is in progress") for n in during.notes)
        code, printed = _cli(capsys, "run", *_flags(corpus, tiny_window_model), "--output", str(out), "--dry-run")
        assert code == 0 and f"lock       held by a running run ({socket.gethostname()} pid {proc.pid}" in printed
        assert "a run started now would exit 75" in printed
        proc.send_signal(signal.SIGTERM)
        # The handler writes the stop request; then the unit in hand may finish.
        wait_for(lambda: (out / "_stop").exists(), timeout=60, proc=proc, what="the SIGTERM handler's stop request")
        (tmp_path / "gate.2").touch()
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    said = _said(err)
    assert proc.returncode == 143 and len(said) == 1 and "Traceback" not in err, err[-3000:]
    assert said[0].startswith("docembed: error: interrupted; rerun to resume (committed units are kept); the stop "
                              f"request could not be removed ([Errno 30] Read-only file system: '{out}/_stop')")
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["ended_at"] > manifest["started_at"]

    after = status(str(out))
    line = format_status(after)
    assert after["state"] == "interrupted" and after["eta_s"] is None and after["units_running"] == 0
    assert "run        interrupted at 20" in line
    assert f"with {after['units_done']}/{UNITS} units committed; rerun the same command to resume" in line
    assert "left at the recent rate" not in line and "running:" not in line
    code, printed = _cli(capsys, "verify", "--output", str(out), "--no-canaries")
    problems = [p for p in printed.splitlines() if p.startswith("  - ")]
    assert code == 1 and len(problems) == 1 and "did not complete: interrupted at" in problems[0], printed
    assert f"{after['docs_done']} rows in {after['units_done']} parts" in printed

    assert (out / "_stop").exists()  # left behind: the rerun removes it before its workers start
    run([*_flags(corpus, tiny_window_model), "--output", str(out)])
    _check_exact(out, reference)
    assert status(str(out))["state"] == "complete" and not (out / "_stop").exists()


@pytest.mark.e2e
def test_a_sigterm_whose_stop_request_cannot_be_written_leaves_a_stale_lock_that_the_commands_see(
        corpus, tiny_window_model, reference, tmp_path, capsys):
    """Writing the stop request fails (EROFS): the workers cannot be told, so the launcher stops at
    once with one line naming the file, exit 143, leaving its lock and a manifest saying "running".
    Status says interrupted (no run holds a live lock: its pid is gone), the dry run says the lock is a
    dead run's and would be taken over, verify names the interruption; the rerun takes the lock over at
    once and is exact."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    proc = _held_at(out, corpus, tiny_window_model, gate, "published:marker@1:pause,publish:stop@1:errno=EROFS")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    said = _said(err)
    assert proc.returncode == 143 and len(said) == 1 and "Traceback" not in err, err[-3000:]
    assert said[0] == ("docembed: error: interrupted; rerun to resume (the workers could not be told to stop: "
                       f"[Errno 30] Read-only file system: '{out}/_stop'; the units in hand were abandoned)")
    assert "finishing the unit in hand" not in err
    assert json.loads((out / "_lock.json").read_text())["pid"] == proc.pid
    assert json.loads((out / "_manifest.json").read_text())["status"] == "running"

    after = status(str(out))
    assert after["state"] == "interrupted" and after["eta_s"] is None
    assert "with 1/4 units committed; rerun the same command to resume" in after["run"]["line"]
    code, printed = _cli(capsys, "run", *_flags(corpus, tiny_window_model), "--output", str(out), "--dry-run")
    assert code == 0 and (f"lock       left by a run that is no longer running ({socket.gethostname()} pid "
                          f"{proc.pid}") in printed
    assert f"its process (pid {proc.pid}) is gone from this host): a run takes it over" in printed
    report = verify(str(out), canaries=False)
    assert len(report.problems) == 1 and "did not complete: interrupted at" in report.problems[0]

    run([*_flags(corpus, tiny_window_model), "--output", str(out)])
    _check_exact(out, reference)


@pytest.mark.unit
def test_whether_a_lock_is_live_is_one_pure_rule():
    now, here = 1000.0, "this-host"
    beat = {"token": "t", "host": "elsewhere", "pid": 7, "heartbeat": now - 30, "ttl": 60}
    assert why_stale(beat, now, here) is None  # 30 s old, its own TTL 60 s
    assert why_stale(beat, now, here, ttl_s=20) == "its last heartbeat is 30s old (stale after 20s)"
    assert why_stale({**beat, "ttl": None}, now + 40, here) is not None  # no TTL recorded: 60 s
    mine = {**beat, "host": here}
    assert why_stale(mine, now, here, alive=lambda pid: True) is None
    assert why_stale(mine, now, here, alive=lambda pid: False) == "its process (pid 7) is gone from this host"
    assert why_stale({"unreadable": "JSONDecodeError: x"}, now, here).startswith("it cannot be read")


@pytest.mark.unit
def test_status_says_how_a_run_ended_from_its_manifest_and_lock():
    markers = {"a": {"run_id": "r", "committed_at": 500.0}}
    failed = {"status": "failed", "run_id": "r", "ended_at": 600.0, "error": "[Errno 28] No space left on device: "
                                                                         "'/out/_manifest.json'"}
    state = run_state(failed, None, markers, 3)
    assert state["state"] == "failed" and not state["live"]
    assert state["line"] == ("failed at 1970-01-01 00:10:00 UTC with 1/3 units committed: [Errno 28] No space left "
                             "on device: '/out/_manifest.json'; rerun the same command to resume")
    killed = {"status": "running", "run_id": "r", "started_at": 400.0}
    stale = {"live": False, "heartbeat": 450.0, "holder": "h pid 1"}
    assert run_state(killed, stale, markers, 3)["line"].startswith("interrupted at 1970-01-01 00:08:20 UTC with 1/3")
    live = {"live": True, "heartbeat": 450.0, "holder": "h pid 1, since ..."}
    assert run_state({"status": "complete"}, live, markers, 3)["state"] == "running"


@pytest.mark.e2e
def test_verify_input_finds_texts_changed_since_they_were_embedded(corpus, tiny_window_model, tmp_path, capsys):
    """A file rewritten in place with other texts of the same byte length, its modification time set
    back: the same size and time, so only the texts tell. verify --input names the file and the rows
    of the unit whose texts changed; a marker written before markers recorded the digest is noted."""
    ids, texts = pq.read_table(corpus / "in.parquet").column("id").to_pylist(), \
        pq.read_table(corpus / "in.parquet").column("text").to_pylist()
    source = tmp_path / "in.parquet"
    plain = {"row_group_size": 10, "compression": "none", "use_dictionary": False, "write_statistics": False}
    pq.write_table(pa.table({"id": ids, "text": texts}), source, **plain)
    out = tmp_path / "out"
    run([*_flags(corpus, tiny_window_model)[2:], "--input", str(source), "--output", str(out)])
    assert _cli(capsys, "verify", "--output", str(out), "--input", str(source), "--no-canaries")[0] == 0

    before = os.stat(source)
    changed = list(texts)
    changed[23] = changed[23][::-1]  # the same characters, so the same bytes, in another order
    assert changed[23] != texts[23]
    pq.write_table(pa.table({"id": ids, "text": changed}), source, **plain)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(source).st_size == before.st_size and os.stat(source).st_mtime_ns == before.st_mtime_ns
    marker = next(p for p in (out / "_checkpoints").glob("*.json") if json.loads(p.read_text())["row_start"] == 0)
    record = json.loads(marker.read_text())
    del record["text_digest"]  # as an earlier version wrote it
    marker.write_text(json.dumps(record))

    code, printed = _cli(capsys, "verify", "--output", str(out), "--input", str(source), "--no-canaries")
    problems = [p for p in printed.splitlines() if p.startswith("  - ")]
    assert code == 1 and problems == [f"  - {source} rows 20-30: texts changed since they were embedded: their "
                                      "vectors belong to the old texts; rerun to re-embed"], printed
    assert ("  note: 1 unit's texts could not be checked against the input: their done-markers were written before "
            "docembed recorded a digest of the texts") in printed
