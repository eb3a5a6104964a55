"""Operations: incremental runs as files arrive or change, the output lock, and SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from docembed.cli import main
from docembed.pipeline.run import run
from tests.conftest import REPO, bare_settings, by_id, cosine, read_output, wait_for, write_docs

FLAGS = ["--no-progress", "--checkpoint-every", "10"]


def _run(inp, out, *extra):
    return run(["--input", str(inp), "--output", str(out), *FLAGS, *extra])


@pytest.mark.e2e
def test_incremental_runs_embed_only_new_files_and_replace_changed_ones(tmp_path, docs, reference_model):
    ids, texts = docs
    inp, out = tmp_path / "in", tmp_path / "out"
    write_docs(inp / "day1.parquet", ids[:30], texts[:30])
    first = _run(inp, out)
    assert (first["embedded"], first["units_committed"]) == (30, 3)

    write_docs(inp / "day2.parquet", ids[30:50], texts[30:50])
    second = _run(inp, out)
    assert (second["embedded"], second["skipped"], second["units_committed"]) == (20, 30, 2)

    write_docs(inp / "day3.parquet", ids[50:60], texts[50:60])
    changed = [f"rewritten: {t}" for t in texts[:25]]  # day1 changes: 25 rows, new text
    write_docs(inp / "day1.parquet", ids[:25], changed)
    third = _run(inp, out)
    assert third["superseded_units"] == 3 and third["skipped"] == 20
    assert third["embedded"] == 25 + 10
    table = read_output(out)
    got = table.column("id").to_pylist()
    assert sorted(got) == sorted(ids[:25] + ids[30:60]) and len(got) == len(set(got))
    vectors = by_id(table)
    assert cosine(vectors[ids[0]], reference_model.encode([changed[0]])[0]) >= 0.9999


def _start(inp, out, *extra):
    cmd = [sys.executable, "-m", "docembed", "run", "--input", str(inp), "--output", str(out), *FLAGS, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc, what, timeout=180):
    wait_for(condition, timeout=timeout, what=what, proc=proc)


def _done(out):
    return len(list((out / "_checkpoints").glob("*.json"))) if (out / "_checkpoints").exists() else 0


@pytest.mark.e2e
def test_a_second_run_is_refused_while_one_holds_the_lock_and_a_stale_lock_is_taken_over(tmp_path, docs, capsys):
    """Refused with exit code 75 (EX_TEMPFAIL: try again later), which a scheduler tells apart from a
    configuration error (2)."""
    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:200], texts[:200], row_group_size=10)
    out = tmp_path / "out"
    first = _start(tmp_path / "in.parquet", out)
    _wait_for(lambda: _done(out) >= 1, first, "the first run to commit a unit")
    code = main(["run", "--input", str(tmp_path / "in.parquet"), "--output", str(out), *FLAGS])
    err = capsys.readouterr().err
    assert code == 75 and "is locked by another run" in err and f"pid {first.pid}" in err and "since" in err
    os.killpg(first.pid, signal.SIGKILL)  # its lock stays behind, and its heartbeat stops
    first.wait()
    lock = json.loads((out / "_lock.json").read_text())
    assert lock["pid"] == first.pid
    lock["host"] = "another-machine"  # as if the killed run had been on another VM: only the TTL tells
    (out / "_lock.json").write_text(json.dumps(lock))
    assert main(["run", "--input", str(tmp_path / "in.parquet"), "--output", str(out), *FLAGS]) == 75
    assert "locked by another run: another-machine" in capsys.readouterr().err
    # Not a condition to wait on: the TTL expiring is what is tested (the lock names another host, so
    # only its heartbeat's age, over --lock-ttl 1, lets the run below take it over).
    time.sleep(1.5)
    summary = run(["--input", str(tmp_path / "in.parquet"), "--output", str(out), *FLAGS, "--lock-ttl", "1"])
    assert summary["embedded"] + summary["skipped"] == 200
    assert not (out / "_lock.json").exists()  # released at the end
    got = read_output(out).column("id").to_pylist()
    assert sorted(got) == sorted(ids[:200]) and len(got) == len(set(got))


@pytest.mark.e2e
def test_sigterm_stops_after_the_unit_in_hand_and_the_rerun_resumes(tmp_path, docs):
    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:200], texts[:200], row_group_size=10)
    out = tmp_path / "out"
    proc = _start(tmp_path / "in.parquet", out)
    _wait_for(lambda: _done(out) >= 2, proc, "the run to commit 2 units")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "interrupted; rerun to resume" in err
    stopped_at = _done(out)
    assert 2 <= stopped_at < 20
    assert not (out / "_stop").exists() and not (out / "_lock.json").exists()
    for part in out.glob("part-*.parquet"):
        assert pq.read_table(part).num_rows == 10
    summary = _run(tmp_path / "in.parquet", out)
    assert summary["units_skipped"] == stopped_at and summary["units_committed"] == 20 - stopped_at
    got = read_output(out).column("id").to_pylist()
    assert sorted(got) == sorted(ids[:200]) and len(got) == len(set(got))


@pytest.mark.e2e
def test_the_cron_wrapper_embeds_each_new_arrival_and_logs(tmp_path, docs):
    ids, texts = docs
    write_docs(tmp_path / "in" / "a.parquet", ids[:5], texts[:5])
    env = {**os.environ, "DOCEMBED_LOG_DIR": str(tmp_path / "logs")}
    wrapper = [str(REPO / "jobs" / "cron" / "docembed-cron.sh"), str(REPO / "jobs" / "local.yaml"),
               "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--passthrough-columns", ""]
    assert subprocess.run(wrapper, env=env, timeout=300).returncode == 0
    write_docs(tmp_path / "in" / "b.parquet", ids[5:8], texts[5:8])
    first_log = next((tmp_path / "logs").glob("local-*.log")).name  # named to the second (UTC)
    wait_for(lambda: time.strftime("local-%Y%m%dT%H%M%SZ.log", time.gmtime()) > first_log, timeout=5,
             what="the clock to pass the first log's second, so that the next run logs under a new name")
    assert subprocess.run(wrapper, env=env, timeout=300).returncode == 0
    logs = sorted((tmp_path / "logs").glob("local-*.log"))
    assert len(logs) == 2
    assert "5 embedded this run" in logs[0].read_text() and "exit 0" in logs[0].read_text()
    assert "3 embedded this run, 5 skipped (already done)" in logs[1].read_text()


@pytest.mark.e2e
def test_multiprocess_direct_runner_kill_and_resume(tmp_path, docs):
    """Two worker processes (each loads the model once); SIGKILL mid-run, then the same command again."""
    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:160], texts[:160], row_group_size=10)
    out = tmp_path / "out"
    multi = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    proc = _start(tmp_path / "in.parquet", out, *multi)
    _wait_for(lambda: _done(out) >= 2, proc, "the multiprocess run to commit 2 units", timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _done(out)
    summary = _run(tmp_path / "in.parquet", out, *multi)
    assert summary["units_skipped"] == at_kill and summary["units_committed"] == 16 - at_kill
    got = read_output(out).column("id").to_pylist()
    assert sorted(got) == sorted(ids[:160]) and len(got) == len(set(got))


@pytest.mark.e2e
def test_sigterm_holds_the_grace_period_in_a_long_unit_on_worker_processes(tmp_path, docs):
    """SIGTERM to the launcher alone while its 2 worker processes are each deep in a 300-row unit (a
    full 256-token window per row): the workers look for the stop request between batches, abandon
    their units at the deadline, and the job ends; before, they finished their units however long
    those took."""
    _, texts = docs
    ids = [f"d{i}" for i in range(600)]
    long = [t for t in texts if len(t) > 4000]
    write_docs(tmp_path / "in.parquet", ids, [long[i % len(long)] + f" {i}" for i in range(600)], row_group_size=300)
    out = tmp_path / "out"
    multi = ["--direct_running_mode=multi_processing", "--direct_num_workers=2", "--grace-period", "2",
             "--checkpoint-every", "300", "--max-batch-size", "8", "--min-batch-size", "8"]
    proc = _start(tmp_path / "in.parquet", out, *multi)
    _wait_for(lambda: list(out.glob("_progress/*.json")), proc, "a progress record (5 s into a unit)", timeout=300)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and time.monotonic() - signalled < 2 + 8
    assert "docembed: error: interrupted; rerun to resume (committed units are kept)" in err
    assert _done(out) < 2  # a unit was abandoned at the deadline, not finished
    summary = _run(tmp_path / "in.parquet", out, "--checkpoint-every", "300")
    assert summary["units_committed"] + summary["units_skipped"] == 2
    got = read_output(out).column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))


@pytest.mark.e2e
def test_ctrl_c_on_a_multiprocess_run_exits_at_once_with_one_line(tmp_path, docs):
    """Ctrl-C reaches the whole process group: the worker processes die at once, so the launcher does
    not wait out the grace period, and says so in one line, not with the runner's tracebacks (the
    workers' own KeyboardInterrupt, printed as they die, is Beam's worker's)."""
    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:160], texts[:160], row_group_size=10)
    out = tmp_path / "out"
    multi = ["--direct_running_mode=multi_processing", "--direct_num_workers=2", "--grace-period", "60"]
    proc = _start(tmp_path / "in.parquet", out, *multi)
    _wait_for(lambda: _done(out) >= 1, proc, "the multiprocess run to commit a unit", timeout=300)
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and time.monotonic() - signalled < 20
    assert "Worker subprocess exited" not in err  # the runner's own error about the lost workers
    # The dying workers share the terminal: their last words can land on the same line as ours, before
    # it (a partial line of theirs) or after it. Each of our lines is one write, so it stays whole.
    said = [line[line.index("docembed:"):] for line in err.splitlines() if "docembed:" in line]
    assert said[-1].startswith("docembed: error: interrupted; rerun to resume (the local workers stopped with "
                               "the signal; the units in hand were abandoned)") and len(said) == 2
    at_stop = _done(out)
    summary = _run(tmp_path / "in.parquet", out)
    assert summary["units_skipped"] == at_stop and summary["units_committed"] == 16 - at_stop
    got = read_output(out).column("id").to_pylist()
    assert sorted(got) == sorted(ids[:160]) and len(got) == len(set(got))


@pytest.mark.unit
def test_a_run_that_lost_its_lock_refuses_to_commit(tmp_path):
    from docembed.store.units import UnitStore
    from docembed.transforms.commit import check_lock
    from docembed.errors import CommitError

    output = UnitStore(str(tmp_path))
    output.publish("_lock.json", json.dumps({"token": "theirs", "host": "h", "pid": 1}).encode())
    settings = bare_settings(str(tmp_path), lock_token="mine")
    with pytest.raises(CommitError, match="no longer holds"):
        check_lock(output, settings)
    output.publish("_lock.json", json.dumps({"token": "mine"}).encode())
    check_lock(output, settings)


@pytest.mark.unit
def test_a_garbage_lock_file_is_taken_over_at_once_instead_of_blocking(tmp_path):
    """docembed writes its lock whole (an exclusive create of a complete file), so a lock file that
    cannot be read is no run's: it is taken over at once, with no TTL to wait out."""
    from docembed.pipeline.lock import OutputLock
    from docembed.store.admin import OutputAdmin

    (tmp_path / "_lock.json").write_text('{"token": "x", "host"')
    started = time.monotonic()
    with OutputLock(OutputAdmin(str(tmp_path)), ttl_s=60):
        assert json.loads((tmp_path / "_lock.json").read_text())["pid"] == os.getpid()
    assert time.monotonic() - started < 5


@pytest.mark.unit
def test_the_lock_of_a_zombie_process_is_taken_over_at_once(tmp_path):
    """A killed run whose parent never reaps it stays a zombie: signal 0 still reaches its pid, but it
    is dead, and its lock is taken over at once."""
    from docembed.pipeline.lock import OutputLock, process_alive
    from docembed.store.admin import OutputAdmin

    zombie = subprocess.Popen(["sleep", "60"])
    zombie.kill()
    wait_for(lambda: open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", timeout=5,
             what=f"the killed process {zombie.pid} to be a zombie", interval=0.01)
    try:
        assert not process_alive(zombie.pid) and process_alive(os.getpid())
        held = {"token": "t", "host": socket.gethostname(), "pid": zombie.pid, "since": time.time(),
                "heartbeat": time.time()}
        (tmp_path / "_lock.json").write_text(json.dumps(held))
        with OutputLock(OutputAdmin(str(tmp_path)), ttl_s=60):
            assert json.loads((tmp_path / "_lock.json").read_text())["pid"] == os.getpid()
    finally:
        zombie.wait()  # reap it


@pytest.mark.e2e
def test_resuming_with_other_columns_is_refused(tmp_path, docs):
    from docembed.errors import FingerprintMismatch

    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:5], texts[:5], title=["t"] * 5)
    _run(tmp_path / "in.parquet", tmp_path / "out")
    with pytest.raises(FingerprintMismatch, match=r"passthrough_columns: \[\] -> \['title'\]"):
        _run(tmp_path / "in.parquet", tmp_path / "out", "--passthrough-columns", "title")


@pytest.mark.unit
def test_passthrough_names_that_clash_with_the_output_columns_are_refused():
    from docembed.pipeline.options import parse
    from docembed.errors import UsageError

    with pytest.raises(UsageError, match="--passthrough-columns embedding"):
        parse(["--input", "a", "--output", "b", "--passthrough-columns", "embedding"])
    with pytest.raises(UsageError, match="--passthrough-columns id"):
        parse(["--input", "a", "--output", "b", "--id-column", "doc", "--passthrough-columns", "id"])
