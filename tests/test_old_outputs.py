"""Outputs written by earlier versions still verify, report and resume: an output of docembed 0.1.0
(before the code moved into the ``docembed`` package), kept as a fixture with its input
(``tests/fixtures/v0.1/``, built by ``tests/fixtures/make_v0_1_output.py``, whose docstring says what
it holds and why its input is served from S3), is put back where it was made and driven with today's
CLI: verify, status and report read it; the same run command finds nothing to do and touches none of
its files; a new input file is embedded alone, and the dataset then holds every id once, the old rows'
vectors bit for bit as the old code wrote them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import BUCKET, REPO, by_id, read_output
from tests.fixtures.make_v0_1_output import INPUT_PREFIX, INPUT_URL, RUN_FLAGS

pytestmark = pytest.mark.e2e

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v0.1"
OLD_UNITS = 5  # a.parquet: rows 0-10, 10-20, 20-24; b.parquet: rows 0-10, 10-16 (--checkpoint-every 10)


def _rows(path: Path) -> list[tuple]:
    table = pq.read_table(path)
    return list(zip(*(table.column(c).to_pylist() for c in ("id", "text", "title"))))


def _expected(files: list[Path], held: set[str] = frozenset()) -> tuple[list[str], list]:
    """(ids embedded, ids rejected) of ``files`` in order, by the documented rules: a null id, a null
    or blank text, or an id seen before (``held``, or earlier in files by URL then rows: keep-first)
    is rejected."""
    seen, embedded, rejected = set(held), [], []
    for path in files:
        for id_, text, _ in _rows(path):
            if id_ is None or text is None or not text.strip() or id_ in seen:
                rejected.append(id_)
            else:
                embedded.append(id_)
            if id_ is not None and text is not None and text.strip():
                seen.add(id_)
    return embedded, rejected


OLD_EMBEDDED, OLD_REJECTED = _expected([FIXTURE / "input" / "a.parquet", FIXTURE / "input" / "b.parquet"])
NEW_EMBEDDED, NEW_REJECTED = _expected([FIXTURE / "added" / "c.parquet"], set(OLD_EMBEDDED))


def _snapshot(out: Path) -> dict[str, tuple[str, int]]:
    """Every file of the output: its bytes' digest and modification time."""
    return {str(p.relative_to(out)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


def _bookkeeping(snapshot: dict, prefixes=("part-", "_checkpoints/", "_rejects/", "_canaries.json",
                                           "_numerics.json")) -> dict:
    return {name: v for name, v in snapshot.items() if name.startswith(prefixes)}


@pytest.fixture
def old_output(s3, tmp_path):
    """The fixture's output folder copied to a fresh place, its input at the URL the old run read;
    yields (output folder, a function running today's CLI with the S3 environment, the S3 filesystem)."""
    fs, env = s3
    prefix = f"{BUCKET}/{INPUT_PREFIX}"
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    for path in sorted((FIXTURE / "input").glob("*.parquet")):
        fs.put_file(str(path), f"{prefix}/{path.name}")
        etag = fs.info(f"{prefix}/{path.name}")["ETag"].strip('"')
        assert etag == hashlib.md5(path.read_bytes()).hexdigest(), "the store's ETag is not the MD5 of the bytes"
    out = tmp_path / "output"
    shutil.copytree(FIXTURE / "output", out)
    run_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "docembed", *args], cwd=REPO, env=run_env,
                              capture_output=True, text=True, timeout=600)

    yield out, cli, fs
    fs.invalidate_cache()
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)


def _run_command(out: Path) -> list[str]:
    return ["run", "--input", INPUT_URL, "--output", str(out), *RUN_FLAGS]


def _check(done: subprocess.CompletedProcess, what: str) -> str:
    assert done.returncode == 0, f"{what}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_fixture_is_a_finished_old_run():
    manifest = json.loads((FIXTURE / "output" / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["plan"]["units"] == OLD_UNITS
    assert manifest["counts"]["embedded"] == len(OLD_EMBEDDED) == 36
    assert manifest["counts"]["rejected"] == len(OLD_REJECTED) == 4
    assert not (FIXTURE / "output" / "_lock.json").exists()
    assert len(list((FIXTURE / "output" / "_reports").glob("*.json"))) == 1
    assert len(NEW_EMBEDDED) == 8 and len(NEW_REJECTED) == 1
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size < 512 * 1024, f"the fixture grew to {size} bytes"


def test_an_old_output_verifies_reports_and_resumes_as_a_no_op(old_output):
    out, cli, _ = old_output
    before = _snapshot(out)
    old_vectors = by_id(read_output(out))
    (report_file,) = (out / "_reports").glob("*.json")
    old_run_id = report_file.stem

    verified = _check(cli("verify", "--output", str(out), "--input", INPUT_URL), "verify --input")
    status = json.loads(_check(cli("status", "--output", str(out), "--json"), "status --json"))
    assert status["state"] == "complete", status
    assert status["units_done"] == status["units_total"] == OLD_UNITS, status
    assert status["docs_total"] == 40, status
    plain = _check(cli("status", "--output", str(out)), "status")
    assert f"{OLD_UNITS}/{OLD_UNITS} units committed" in plain and "40/40 done" in plain, plain
    report = _check(cli("report", "--output", str(out)), "report")
    assert f"docembed run {old_run_id}" in report and "36 embedded" in report, report
    assert _snapshot(out) == before, "verify, status or report changed the output"

    rerun = _check(cli(*_run_command(out)), "the same run command again")
    assert f"0 committed this run, {OLD_UNITS} already done" in rerun, rerun
    assert "0 embedded this run" in rerun, rerun
    after = _snapshot(out)
    assert _bookkeeping(after) == _bookkeeping(before), "the rerun rewrote parts, markers or rejections"
    assert sorted(p.name for p in out.glob("part-*")) == sorted(n for n in before if n.startswith("part-"))
    table = read_output(out)
    assert sorted(table.column("id").to_pylist()) == sorted(OLD_EMBEDDED)
    assert all(np.array_equal(v, old_vectors[i]) for i, v in by_id(table).items())
    print(f"\nold output: verify\n{verified}\nrerun\n{rerun}")


def test_an_old_output_embeds_only_a_new_input_file(old_output):
    out, cli, fs = old_output
    before = _snapshot(out)
    old_table = read_output(out)
    old_vectors = by_id(old_table)
    old_titles = dict(zip(old_table.column("id").to_pylist(), old_table.column("title").to_pylist()))
    fs.put_file(str(FIXTURE / "added" / "c.parquet"), f"{BUCKET}/{INPUT_PREFIX}/c.parquet")

    ran = _check(cli(*_run_command(out)), "the run with a new input file")
    assert f"1 committed this run, {OLD_UNITS} already done" in ran, ran
    assert f"{len(NEW_EMBEDDED)} embedded this run" in ran and f"{len(OLD_EMBEDDED) + len(OLD_REJECTED)} skipped" in ran, ran
    after = _snapshot(out)
    assert {k: v for k, v in _bookkeeping(after).items() if k in before} == _bookkeeping(before), \
        "the old units' files were rewritten"
    new_files = sorted(set(_bookkeeping(after)) - set(before))
    assert [n.split("/")[0].split("-")[0] for n in new_files] == ["_checkpoints", "_rejects", "part"], new_files

    table = read_output(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id is in the output twice"
    assert sorted(ids) == sorted(OLD_EMBEDDED + NEW_EMBEDDED)
    vectors = by_id(table)
    assert all(np.array_equal(vectors[i], old_vectors[i]) for i in OLD_EMBEDDED), "an old row's vector changed"
    assert all(vectors[i].shape == (384,) and abs(np.linalg.norm(vectors[i]) - 1) < 1e-3 for i in NEW_EMBEDDED)
    titles = dict(zip(ids, table.column("title").to_pylist()))
    assert all(titles[i] == old_titles[i] for i in OLD_EMBEDDED)
    new_rows = {r[0]: r for r in _rows(FIXTURE / "added" / "c.parquet")}
    assert all(titles[i] == new_rows[i][2] for i in NEW_EMBEDDED)
    (rejects_file,) = [out / n for n in new_files if n.startswith("_rejects/")]
    rejects = pq.read_table(rejects_file).to_pylist()
    assert [(r["id"], r["reason"]) for r in rejects] == [(i, "duplicate_id") for i in NEW_REJECTED], rejects

    _check(cli("verify", "--output", str(out), "--input", INPUT_URL), "verify --input after the new file")
    status = json.loads(_check(cli("status", "--output", str(out), "--json"), "status --json"))
    assert status["state"] == "complete" and status["units_done"] == status["units_total"] == OLD_UNITS + 1, status
