"""Kill and resume: a run SIGKILLed mid-way, rerun with the same command, equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from docembed.pipeline.run import run
from docembed.pipeline.admin.status import status
from tests.conftest import REPO, by_id, read_output, wait_for, write_docs

pytestmark = pytest.mark.e2e

UNIT_ROWS = 10


def _command(input_glob, out):
    return [sys.executable, "-m", "docembed", "run", "--input", input_glob, "--output", str(out),
            "--checkpoint-every", str(UNIT_ROWS), "--no-progress"]


def _markers(out):
    return {p.stem: json.loads(p.read_text()) for p in (out / "_checkpoints").glob("*.json")}


def _wait_for_units(out, proc, count, timeout=180):
    wait_for(lambda: len(list((out / "_checkpoints").glob("*.json"))) >= count, timeout=timeout, proc=proc,
             what=f"{count} units committed to {out}")


def test_sigkill_then_rerun_gives_the_uninterrupted_dataset(tmp_path, docs):
    ids, texts = docs
    write_docs(tmp_path / "in" / "a.parquet", ids[:150], texts[:150], row_group_size=10)
    write_docs(tmp_path / "in" / "b.parquet", ids[150:], texts[150:], row_group_size=10)
    glob = f"{tmp_path}/in/*.parquet"
    out = tmp_path / "resumed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    total_units = -(-150 // UNIT_ROWS) + -(-(len(ids) - 150) // UNIT_ROWS)

    proc = subprocess.Popen(_command(glob, out), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_units(out, proc, 3)
    during = status(str(out))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _markers(out)
    assert 3 <= len(at_kill) < total_units, "the run finished before it could be killed"
    assert during["state"] == "running" and during["units_total"] == total_units
    assert 3 <= during["units_done"] <= len(at_kill) and during["docs_total"] == len(ids)
    for part in out.glob("part-*.parquet"):  # whatever was visible at the kill is a whole file
        assert pq.read_table(part).num_rows > 0

    rerun = subprocess.run(_command(glob, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{total_units - len(at_kill)} committed this run, {len(at_kill)} already done" in rerun.stdout
    after = _markers(out)
    for unit_id, marker in at_kill.items():  # units done before the kill were not redone
        assert after[unit_id]["run_id"] == marker["run_id"]
    print(f"\nkill-and-resume: {len(at_kill)}/{total_units} units done at SIGKILL; "
          f"the rerun committed {total_units - len(at_kill)}")

    straight = tmp_path / "straight"
    run(["--input", glob, "--output", str(straight), "--checkpoint-every", str(UNIT_ROWS), "--no-progress"])
    resumed_table, straight_table = read_output(out), read_output(straight)
    resumed_ids = resumed_table.column("id").to_pylist()
    assert len(resumed_ids) == len(set(resumed_ids)) == len(ids)
    assert sorted(resumed_ids) == sorted(straight_table.column("id").to_pylist()) == sorted(ids)
    resumed, reference = by_id(resumed_table), by_id(straight_table)
    assert all(np.allclose(resumed[i], reference[i], atol=1e-6) for i in ids)

    final = status(str(out))
    assert final["state"] == "complete"
    assert (final["units_done"], final["docs_done"]) == (total_units, len(ids))
