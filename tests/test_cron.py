"""The crontab line of jobs/cron/ as cron runs it: /bin/sh -c with cron's bare environment (PATH=/usr/bin:/bin,
HOME, SHELL, nothing else) and a working directory that is not the repository's, against a job file whose
paths are relative to its own folder. Two ticks: the first embeds everything, the second only what arrived
since."""

from __future__ import annotations

import shlex
import subprocess
import time

import pytest

from tests.conftest import REPO, read_output, wait_for, write_docs

pytestmark = pytest.mark.e2e

WRAPPER = REPO / "jobs" / "cron" / "docembed-cron.sh"


def _tick(job, logs, cwd, home) -> subprocess.CompletedProcess:
    """One cron tick: the crontab line's command run by /bin/sh, as cron does, in cron's environment."""
    line = f"DOCEMBED_LOG_DIR={shlex.quote(str(logs))} {shlex.quote(str(WRAPPER))} {shlex.quote(str(job))} " \
           "--checkpoint-every 10"
    return subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"HOME={home}", "SHELL=/bin/sh", "/bin/sh", "-c", line],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_crontab_line_runs_a_job_file_with_relative_paths_from_crons_directory(tmp_path, docs):
    ids, texts = docs
    ids, texts = ids[:30], texts[:30]
    jobs = tmp_path / "srv" / "jobs"
    write_docs(jobs / "inbox" / "a.parquet", ids[:20], texts[:20])
    job = jobs / "nightly.yaml"
    job.write_text("docembed:\n  input: inbox/\n  output: ../embeddings/\n")
    out = tmp_path / "srv" / "embeddings"
    cwd, home, logs = tmp_path / "cron-cwd", tmp_path / "home", tmp_path / "logs"
    cwd.mkdir()
    home.mkdir()

    first = _tick(job, logs, cwd, home)
    [first_log] = sorted(logs.glob("nightly-*.log"))  # named to the second (UTC)
    text = first_log.read_text()
    assert first.returncode == 0, text[-3000:]
    assert "exit 0" in text and f"output in {out}/" in text
    assert "20 embedded this run, 0 skipped (already done)" in text and "2 committed this run" in text
    got = read_output(out).column("id").to_pylist()
    assert sorted(got) == sorted(ids[:20]) and len(got) == len(set(got))

    write_docs(jobs / "inbox" / "b.parquet", ids[20:], texts[20:])
    wait_for(lambda: time.strftime("nightly-%Y%m%dT%H%M%SZ.log", time.gmtime()) > first_log.name, timeout=5,
             what="the clock to pass the first log's second, so that the next tick logs under a new name")
    second = _tick(job, logs, cwd, home)
    second_log = next(p for p in sorted(logs.glob("nightly-*.log")) if p != first_log)
    text = second_log.read_text()
    assert second.returncode == 0, text[-3000:]
    assert "exit 0" in text
    assert "10 embedded this run, 20 skipped (already done)" in text
    assert "1 committed this run, 2 already done, 3 in all" in text
    got = read_output(out).column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    assert not any(cwd.iterdir()), "cron's working directory stays untouched"
