"""Beam's portable path, as Flink, Spark and Dataflow use it: the PortableRunner against Beam's local job
service, with the work done by an external SDK worker pool (--environment_type=EXTERNAL)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port, read_output, write_docs


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "a Beam service exited at start"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listens on port {port} after {timeout}s")


@pytest.fixture
def portable_services():
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}  # the pool runs `python`
    job_port, pool_port = free_port(), free_port()
    services = [
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                          "--port", str(job_port)], env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                          "--service_port", str(pool_port)], env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        _wait_port(job_port, services[0])
        _wait_port(pool_port, services[1])
        yield job_port, pool_port, env
    finally:
        for proc in services:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_portable_runner_with_an_external_worker_pool(tmp_path, docs, portable_services):
    job_port, pool_port, env = portable_services
    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:40], texts[:40])
    cmd = [sys.executable, "-m", "pipeline", "run", "--input", str(tmp_path / "in.parquet"),
           "--output", str(tmp_path / "out"), "--checkpoint-every", "10", "--no-progress",
           "--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}",
           "--environment_type=EXTERNAL", f"--environment_config=localhost:{pool_port}"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 committed this run" in done.stdout
    got = read_output(tmp_path / "out").column("id").to_pylist()
    assert sorted(got) == sorted(ids[:40]) and len(got) == len(set(got))
