"""Beam's DaskRunner on a real Dask cluster: a scheduler and single-thread workers on 127.0.0.1, each
from a venv holding only docembed's sdist with its ``dask`` extra and blind to the checkout
(``conftest.blind``: the scheduler unpickles the graph too). Input and output are on the local disk
the processes share, as a cluster's shared file system would be.

Dask re-runs the tasks of a lost worker from their start on another worker, finished ones included
(their results were held in the dead worker's memory). Each crash test starts worker A alone, armed to
die (``os._exit``, as SIGKILL or a lost VM would end it) at one point of a commit; once A is dead,
worker B joins and finishes the job, re-running what A had done. The same command must exit 0 with
the output of an uninterrupted DirectRunner run: the same rows, bit-identical vectors, the input's own
repeats rejected and nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from docembed.store.admin import OutputAdmin
from docembed.pipeline.run import run
from docembed.pipeline.admin.verify import verify
from tests.conftest import REPO, blind, by_id, free_port, kill_group, read_output, wait_port, write_docs

pytestmark = pytest.mark.servers

CRASH_EXIT = 97
UNITS = 4
# Where worker A dies: before any commit, between a part and its marker, between a marker and the next
# unit, after its last commit (every unit committed; the job's result lost with A).
POINTS = ["publish:part@1", "published:part@2", "published:marker@2", f"published:marker@{UNITS}"]
# Rows whose id repeats an earlier one: within a unit, across units, and the file's last row.
REPEATS = {5: 2, 25: 12, 39: 0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs) -> dict:
    """40 documents in 4 units of 10, with unique ids (``error``) and with three repeated (``keep-first``)."""
    tmp = tmp_path_factory.mktemp("dask-corpus")
    ids, texts = docs
    ids, texts = list(ids[:40]), list(texts[:40])
    repeated = [ids[REPEATS[row]] if row in REPEATS else ident for row, ident in enumerate(ids)]
    return {"error": write_docs(tmp / "unique" / "in.parquet", ids, texts, row_group_size=10),
            "keep-first": write_docs(tmp / "repeated" / "in.parquet", repeated, texts, row_group_size=10)}


class Cluster:
    """A Dask scheduler and the workers the tests start, all from the worker venv."""

    def __init__(self, venv, logs):
        self.venv, self.logs, self.port, self.procs = venv, logs, free_port(), []
        self.env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ["HOME"],
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Cluster":
        scheduler = blind(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
                          self.env, self.logs / "scheduler.log")
        self.procs.append(scheduler)
        wait_port(self.port, scheduler)
        return self

    def worker(self, name: str, fault: str | None = None):
        """A worker process with one thread and no nanny: killed, it stays dead, as a lost VM does."""
        env = {**self.env, **({"DOCEMBED_FAULT": fault} if fault else {})}
        proc = blind(["dask", "worker", f"tcp://{self.address}", "--nthreads", "1", "--no-nanny", "--no-dashboard",
                      "--name", name], env, self.logs / f"worker-{name}.log")
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            kill_group(proc)


@pytest.fixture(scope="module")
def cluster(worker_venv, tmp_path_factory):
    started = Cluster(worker_venv, tmp_path_factory.mktemp("dask-logs")).start()
    yield started
    started.stop()


def _argv(corpus: dict, mode: str, output) -> list[str]:
    # One thread everywhere, so that vectors are bit-identical across the DirectRunner and the workers.
    return ["run", "--input", str(corpus[mode]), "--output", str(output), "--checkpoint-every", "10",
            "--no-progress", "--threads", "1", "--on-duplicate-id", mode]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict:
    """Each mode's output from an uninterrupted DirectRunner run."""
    tmp = tmp_path_factory.mktemp("dask-reference")
    for mode in corpus:
        run(_argv(corpus, mode, tmp / mode)[1:])
    return {mode: tmp / mode for mode in corpus}


def _launch(cluster: Cluster, corpus: dict, mode: str, output) -> subprocess.Popen:
    command = [sys.executable, "-m", "docembed", *_argv(corpus, mode, output), "--runner", "DaskRunner",
               "--dask_client_address", cluster.address]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_with_one_worker(cluster: Cluster, argv: list[str], name: str) -> subprocess.CompletedProcess:
    """The command ``argv`` on the cluster with one worker of its own, to the end."""
    command = [sys.executable, "-m", "docembed", *argv, "--runner", "DaskRunner", "--dask_client_address",
               cluster.address]
    worker = cluster.worker(name)
    try:
        return subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                              text=True, timeout=600)
    finally:
        kill_group(worker)


def _finish(launcher: subprocess.Popen, cluster: Cluster) -> str:
    try:
        out, err = launcher.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        kill_group(launcher)
        pytest.fail(f"the job did not finish; logs in {cluster.logs}")
    assert launcher.returncode == 0, err[-3000:]
    return out


def _check(url, reference, corpus_file) -> None:
    """The output is the reference's, row for row and bit for bit; it verifies against the input; no
    file is left that no done-marker names."""
    got, want = read_output(url), read_output(reference)
    assert sorted(got.column("id").to_pylist()) == sorted(want.column("id").to_pylist())
    assert got.num_rows == len(set(got.column("id").to_pylist()))
    got, want = by_id(got), by_id(want)
    assert all(np.array_equal(got[i], want[i]) for i in want)
    admin = OutputAdmin(str(url))
    markers = admin.done_markers()
    assert len(markers) == UNITS
    rejects = admin.read_rejects(markers)
    wanted = OutputAdmin(str(reference)).read_rejects(OutputAdmin(str(reference)).done_markers())
    assert sorted(rejects.column("row_index").to_pylist()) == sorted(wanted.column("row_index").to_pylist())
    assert set(rejects.column("reason").to_pylist()) <= {"duplicate_id"}
    assert set(admin.part_files()) == {p for m in markers.values() for p in [m["part"]] if p}
    report = verify(str(url), str(corpus_file), canaries=False)
    assert report.problems == [], report.problems


def test_a_dask_cluster_embeds_what_the_direct_runner_does(cluster, corpus, reference, tmp_path):
    """Two workers, every unit its own task: the same output as the DirectRunner's, and a report
    built from the done-markers (Beam's DaskRunner collects no metrics)."""
    launcher = _launch(cluster, corpus, "keep-first", tmp_path / "out")
    workers = [cluster.worker("both-1"), cluster.worker("both-2")]
    out = _finish(launcher, cluster)
    for worker in workers:
        kill_group(worker)
    _check(tmp_path / "out", reference["keep-first"], corpus["keep-first"])
    assert "units      4 committed this run, 0 already done, 4 in all" in out
    assert "3 duplicate_id" in out and "report     " in out
    committed_by = {m["worker"]["pid"] for m in OutputAdmin(str(tmp_path / "out")).done_markers().values()}
    assert len(committed_by) == 2  # one unit per task: both workers took units
    assert OutputAdmin(str(tmp_path / "out")).read_manifest()["status"] == "complete"


@pytest.mark.parametrize("mode", ["error", "keep-first"])
@pytest.mark.parametrize("point", POINTS + ["published:plan@1"])
def test_a_lost_worker_is_replaced_and_the_same_command_finishes_exactly(cluster, corpus, reference, tmp_path,
                                                                         point, mode):
    if point.startswith("published:plan") and mode == "error":
        pytest.skip("the duplicate-id job writes a unit's repeats only where there are some")
    launcher = _launch(cluster, corpus, mode, tmp_path / "out")
    doomed = cluster.worker("a", point)
    try:
        assert doomed.wait(timeout=600) == CRASH_EXIT, f"worker A did not die at {point}"
    except subprocess.TimeoutExpired:
        kill_group(launcher)
        pytest.fail(f"worker A never reached {point}; logs in {cluster.logs}")
    survivor = cluster.worker("b")
    _finish(launcher, cluster)
    kill_group(survivor)
    _check(tmp_path / "out", reference[mode], corpus[mode])


def test_the_duplicate_id_job_names_the_repeats_under_error(cluster, corpus, tmp_path):
    """Under --on-duplicate-id error the first job fails on the workers, naming the repeats, and no
    document is embedded."""
    argv = _argv(corpus, "keep-first", tmp_path / "out")
    argv[argv.index("keep-first")] = "error"
    done = _run_with_one_worker(cluster, argv, "error")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "docembed: error: the job failed: 3 rows repeat an id" in done.stderr
    assert not OutputAdmin(str(tmp_path / "out")).done_markers()
    assert pq.read_table(corpus["keep-first"]).num_rows == 40


def test_a_device_the_workers_lack_is_refused_once(cluster, corpus, tmp_path):
    """The launcher of a cluster job cannot see the workers' hardware: a worker refuses --device cuda
    (it has no GPU), the job fails with exit 1, and the refusal is printed once."""
    done = _run_with_one_worker(cluster, [*_argv(corpus, "error", tmp_path / "out"), "--device", "cuda"], "nogpu")
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.count("torch sees no CUDA device") == 1, done.stderr[-3000:]
    assert done.stderr.count("docembed: error: the job failed:") == 1
    assert not OutputAdmin(str(tmp_path / "out")).done_markers()
