"""Every crash point of a unit's commit, deterministically: the process is killed (``os._exit``) just
before and just after each file of the commit appears (part, rejections, the numerics and canary pins,
the marker), of the manifest at the start and at the end, of the plan, of the report, and at a
heartbeat; then the same command is rerun. After each: the exact output of an uninterrupted run, `verify` passes, and no
orphan is left (no part or rejections file that no marker names, no scratch file, plan, progress record,
lock or stop request). On local disk and on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from docembed.store.admin import OutputAdmin
from docembed.pipeline.run import run
from docembed.pipeline.admin.verify import verify
from tests.conftest import BUCKET, REPO, by_id, read_output, write_docs

COMMIT = [f"{when}:{kind}@1" for kind in ("part", "rejects", "numerics", "canaries", "marker")
          for when in ("publish", "published")]
AROUND = ["publish:plan@1", "publish:manifest@1", "published:manifest@1", "published:marker@2",
          "publish:manifest@2", "published:manifest@2", "publish:report@1", "publish:heartbeat@1"]
FAULTS = COMMIT + AROUND
CRASH_EXIT = 97


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs):
    """20 documents in 2 units of 10, each unit with one empty text (so each commits rejections)."""
    tmp = tmp_path_factory.mktemp("crash")
    ids, texts = docs
    texts = list(texts[:20])
    texts[3], texts[14] = "", "  "
    write_docs(tmp / "in.parquet", ids[:20], texts, row_group_size=10)
    return tmp


def _argv(corpus, model) -> list[str]:
    return ["run", "--input", str(corpus / "in.parquet"), "--checkpoint-every", "10", "--no-progress",
            "--model", model, "--lock-ttl", "2"]


def _walk(corpus, model, outputs: dict[str, str], tmp_path, faults=FAULTS, again=()) -> dict:
    spec = {"argv": _argv(corpus, model), "outputs": outputs, "faults": faults, "logs": str(tmp_path),
            "again": list(again)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "tests.crash_walk", str(tmp_path / "spec.json")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check(url: str, reference: dict, fault: str, codes: list[int], logs, expected=(CRASH_EXIT, 0)) -> None:
    log = (logs / f"{fault.replace(':', '_').replace('@', '_')}.log").read_text()[-2000:]
    assert codes == list(expected), f"{fault}: {codes}\n{log}"
    output = OutputAdmin(url)
    markers = output.done_markers()
    named = {m["part"] for m in markers.values() if m["part"]} | {m["rejects"].split("/")[-1]
                                                                  for m in markers.values() if m["rejects"]}
    left = {name for name in list(output.sizes()) + list(output.sizes("_rejects")) if name not in named}
    left |= set(output.sizes("_attempts")) | set(output.sizes("_progress"))
    assert left <= {"_manifest.json", "_numerics.json", "_canaries.json"}, f"{fault}: orphans {left}"
    assert not output.fs.exists(output.path("_plans")) or not output.sizes("_plans"), fault
    assert output.read_lock() is None and not output.stop_requested(), fault
    assert verify(url).problems == [], fault
    got = by_id(read_output(url) if "://" not in url else _s3_table(url))
    assert sorted(got) == sorted(reference), fault
    assert max(np.abs(got[i] - reference[i]).max() for i in reference) < 1e-5, fault


def _s3_table(url: str):
    import pyarrow.dataset as ds
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return ds.dataset(url.split("://", 1)[1], format="parquet", filesystem=fs).to_table()


@pytest.mark.e2e
def test_every_crash_point_on_local_disk(corpus, tiny_window_model, tmp_path):
    run(_argv(corpus, tiny_window_model)[1:] + ["--output", str(tmp_path / "reference")])
    reference = by_id(read_output(tmp_path / "reference"))
    outputs = {fault: str(tmp_path / f"out-{k}") for k, fault in enumerate(FAULTS)}
    results = _walk(corpus, tiny_window_model, outputs, tmp_path)
    for fault in FAULTS:
        _check(outputs[fault], reference, fault, results[fault], tmp_path)


@pytest.mark.servers
def test_every_crash_point_on_s3(s3, corpus, tiny_window_model, tmp_path):
    run(_argv(corpus, tiny_window_model)[1:] + ["--output", str(tmp_path / "reference")])
    reference = by_id(read_output(tmp_path / "reference"))
    outputs = {fault: f"s3://{BUCKET}/crash/{k}" for k, fault in enumerate(FAULTS)}
    results = _walk(corpus, tiny_window_model, outputs, tmp_path)
    for fault in FAULTS:
        _check(outputs[fault], reference, fault, results[fault], tmp_path)


# Points inside the embedding job after which a unit's files exist: its part, its rejections, its
# marker; the first unit's and the second's.
AGAIN = ["published:part@1", "published:rejects@1", "published:marker@1", "published:part@2", "published:marker@2"]


@pytest.mark.e2e
def test_a_units_stages_run_again_after_its_part_or_marker_exists(corpus, tiny_window_model, tmp_path):
    """As Flink or Spark re-run a stage after losing a worker: the killed run's embedding job is run
    again as submitted (its plan, its settings, its lock token) after some of its units' parts or
    markers exist, then the same command finishes. Nothing is done twice and the output is exact."""
    run(_argv(corpus, tiny_window_model)[1:] + ["--output", str(tmp_path / "reference")])
    reference = by_id(read_output(tmp_path / "reference"))
    outputs = {fault: str(tmp_path / f"again-{k}") for k, fault in enumerate(AGAIN)}
    results = _walk(corpus, tiny_window_model, outputs, tmp_path, AGAIN, again=AGAIN)
    for fault in AGAIN:
        _check(outputs[fault], reference, fault, results[fault], tmp_path, (CRASH_EXIT, 0, 0))
        markers = OutputAdmin(outputs[fault]).done_markers()
        assert len({m["run_id"] for m in markers.values()}) == 1, fault  # the re-run job committed what was left
