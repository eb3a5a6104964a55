"""``docembed convert``: a float32 output written again in another dtype or with fewer dimensions,
without re-embedding, must be what a direct ``docembed run`` with those flags writes (vectors,
fingerprint, units, calibration), pass ``docembed verify``, be accepted by such a run as its own, and
resume after a crash to the same result as a convert that was never stopped."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from docembed import vectors as vectors_mod
from docembed.errors import UsageError
from docembed.pipeline.admin.verify import verify
from docembed.store.layout import CANARIES, CHECKPOINTS, LOCK, MANIFEST, NUMERICS, QUANTIZATION, REJECTS
from docembed.pipeline.convert import target_of
from tests.conftest import REPO, cosine, read_output, vectors, write_docs

DOCS = 120
EMPTY = (5, 70)  # rows whose text is blank: rejected as empty_text, one in each unit of 60


def docembed(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command line, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "docembed", *args], check=False, cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{done.args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def made(tmp_path_factory, docs) -> dict[str, Path]:
    """Five `docembed run`s of one input of 120 documents: float32 in two units (``src``) and in one
    (``src1``); direct runs at binary (two units), int8 (one unit) and --truncate-dim 128 (two units);
    and `docembed convert`s of the float32 outputs to int8, binary and --truncate-dim 128."""
    tmp = tmp_path_factory.mktemp("convert")
    ids, texts = docs[0][:DOCS], list(docs[1][:DOCS])
    for row in EMPTY:
        texts[row] = "  "
    write_docs(tmp / "in.parquet", ids, texts, row_group_size=60)
    runs = {"src": [], "src1": ["--checkpoint-every", "1000"], "binary": ["--output-dtype", "binary"],
            "int8_1": ["--checkpoint-every", "1000", "--output-dtype", "int8"], "trunc": ["--truncate-dim", "128"]}
    for name, flags in runs.items():
        ok(docembed("run", "--input", str(tmp / "in.parquet"), "--output", str(tmp / name), "--checkpoint-every", "60",
                    "--no-progress", *flags))
    converts = {"cv_int8": ("src", ["--output-dtype", "int8"]), "cv_binary": ("src", ["--output-dtype", "binary"]),
                "cv_int8_1": ("src1", ["--output-dtype", "int8"]), "cv_trunc": ("src", ["--truncate-dim", "128"])}
    for name, (source, flags) in converts.items():
        printed = ok(docembed("convert", "--output", str(tmp / source), "--to", str(tmp / name), *flags))
        assert "converted now" in printed, printed
    return {"input": tmp / "in.parquet", **{name: tmp / name for name in [*runs, *converts]}}


def stored(folder: Path) -> dict[str, np.ndarray]:
    table = read_output(folder)
    return dict(zip(table.column("id").to_pylist(), vectors(table)))


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def markers(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (folder / CHECKPOINTS).glob("*.json")}


def files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# Marker fields a convert sets for itself, as a run does for its commits.
OWN = ("run_id", "committed_at", "converted_from", "part_bytes")


def same_units(a: Path, b: Path, own=OWN) -> None:
    """The two outputs hold the same units, with the same records apart from ``own`` fields."""
    left, right = markers(a), markers(b)
    assert sorted(left) == sorted(right)
    for unit_id in left:
        assert {k: v for k, v in left[unit_id].items() if k not in own} == \
               {k: v for k, v in right[unit_id].items() if k not in own}, unit_id


@pytest.mark.e2e
def test_binary_vectors_are_the_direct_runs_bit_for_bit(made):
    direct, converted = stored(made["binary"]), stored(made["cv_binary"])
    assert sorted(direct) == sorted(converted) and len(direct) == DOCS - len(EMPTY)
    assert all(np.array_equal(direct[i], converted[i]) for i in direct)
    assert manifest(made["cv_binary"])["fingerprint"] == manifest(made["binary"])["fingerprint"]
    assert verify(str(made["cv_binary"]), str(made["input"])).problems == []


@pytest.mark.e2e
def test_int8_codes_of_a_one_unit_output_are_the_direct_runs(made):
    """One unit: the direct run and the convert calibrate on the same vectors, so the codes agree."""
    direct, converted = stored(made["int8_1"]), stored(made["cv_int8_1"])
    assert sorted(direct) == sorted(converted)
    a, b = (np.stack([found[i] for i in sorted(direct)]).astype(int) for found in (direct, converted))
    assert np.abs(a - b).max() <= 1 and np.mean(a == b) >= 0.999
    ranges = [json.loads((made[n] / QUANTIZATION).read_text())["ranges"] for n in ("int8_1", "cv_int8_1")]
    assert np.allclose(*ranges, atol=1e-6)
    assert manifest(made["cv_int8_1"])["quantization"] == json.loads((made["cv_int8_1"] / QUANTIZATION).read_text())
    assert verify(str(made["cv_int8_1"]), str(made["input"])).problems == []


@pytest.mark.e2e
def test_int8_calibration_comes_from_the_unit_the_source_committed_first(made):
    first = min(markers(made["src"]).values(), key=lambda m: m["committed_at"])
    floats = vectors(pq.read_table(made["src"] / first["part"]))
    pinned = np.asarray(json.loads((made["cv_int8"] / QUANTIZATION).read_text())["ranges"], dtype=np.float32)
    assert np.array_equal(pinned, vectors_mod.calibration(floats))
    # Every part was bucketed with it, from the source's float vectors.
    source, converted = stored(made["src"]), stored(made["cv_int8"])
    ids = sorted(source)
    expected = vectors_mod.quantize(np.stack([source[i] for i in ids]), "int8", pinned)
    assert np.array_equal(np.stack([converted[i] for i in ids]), expected)


@pytest.mark.e2e
def test_truncated_vectors_match_a_direct_truncate_dim_run_and_verify(made):
    direct, converted = stored(made["trunc"]), stored(made["cv_trunc"])
    ids = sorted(direct)
    assert sorted(converted) == ids
    a, b = (np.stack([found[i] for i in ids]) for found in (direct, converted))
    assert b.shape == (len(ids), 128) and cosine(a, b).min() >= 0.99999
    assert np.abs(np.linalg.norm(b, axis=1) - 1).max() < 1e-5
    assert manifest(made["cv_trunc"])["fingerprint"] == manifest(made["trunc"])["fingerprint"]
    # The canaries are cut like the vectors, so verify re-embedding them at 128 dimensions agrees.
    printed = ok(docembed("verify", "--output", str(made["cv_trunc"]), "--input", str(made["input"])))
    assert ": OK" in printed and "canaries: 19 re-embedded" in printed


@pytest.mark.e2e
def test_the_output_is_what_a_direct_run_leaves_and_a_run_resumes_it(made):
    cv, direct = made["cv_binary"], made["binary"]
    ours, theirs = manifest(cv), manifest(direct)
    for key in ("status", "fingerprint", "settings", "counts", "parts", "rejects", "inputs", "plan", "numerics"):
        assert ours[key] == theirs[key], key
    assert ours["converted_from"]["output"] == str(made["src"]) and ours["converted_from"]["run_id"] \
        == manifest(made["src"])["run_id"]
    # Same units, rejections and counts as the source (run-made fields aside: timings, statistics of the batches).
    same_units(made["src"], cv)
    assert sorted(p.name for p in (cv / REJECTS).iterdir()) == sorted(p.name for p in (made["src"] / REJECTS).iterdir())
    for name in (NUMERICS, CANARIES):
        assert (cv / name).read_bytes() == (made["src"] / name).read_bytes()
    # A run with the converted settings accepts the output as its own: nothing to do.
    printed = ok(docembed("run", "--input", str(made["input"]), "--output", str(cv), "--checkpoint-every", "60",
                          "--output-dtype", "binary", "--no-progress"))
    assert markers(cv).keys() == markers(made["src"]).keys()
    assert manifest(cv)["status"] == "complete" and manifest(cv)["fingerprint"] == theirs["fingerprint"], printed


@pytest.mark.e2e
def test_a_convert_killed_after_its_first_unit_resumes_to_the_same_output(made, tmp_path):
    dst = tmp_path / "resumed"
    args = ("convert", "--output", str(made["src"]), "--to", str(dst), "--output-dtype", "int8")
    # Killed (as SIGKILL would) once the second unit's part is published, before its marker.
    killed = docembed(*args, env={"DOCEMBED_FAULT": "published:part@2"})
    assert killed.returncode == 97, killed.stderr[-2000:]
    assert len(markers(dst)) == 1 and len(list(dst.glob("part-*.parquet"))) == 2
    printed = ok(docembed(*args))
    assert "1 converted now, 1 already done" in printed
    whole = made["cv_int8"]
    assert sorted(p.name for p in dst.glob("part-*.parquet")) == sorted(p.name for p in whole.glob("part-*.parquet"))
    for part in whole.glob("part-*.parquet"):
        assert pq.read_table(dst / part.name).equals(pq.read_table(part), check_metadata=True), part.name
    for name in (QUANTIZATION, NUMERICS, CANARIES):
        assert (dst / name).read_bytes() == (whole / name).read_bytes(), name
    same_units(dst, whole, own=("run_id", "committed_at"))
    ended = {k: v for k, v in manifest(dst).items() if k not in ("run_id", "started_at", "finished_at")}
    assert ended == {k: v for k, v in manifest(whole).items() if k not in ("run_id", "started_at", "finished_at")}
    assert verify(str(dst), canaries=False).problems == []


@pytest.mark.e2e
def test_a_failed_convert_says_so_and_a_live_lock_stops_one(made, tmp_path):
    dst = tmp_path / "failed"
    args = ("convert", "--output", str(made["src"]), "--to", str(dst), "--output-dtype", "binary")
    failed = docembed(*args, env={"DOCEMBED_FAULT": "publish:marker@2:raise"})  # the store fails the second marker
    assert failed.returncode == 1 and "rerun the same command to resume" in failed.stderr, failed.stderr
    assert manifest(dst)["status"] == "failed" and "fault injected" in manifest(dst)["error"]
    assert len(markers(dst)) == 1 and not (dst / LOCK).exists()
    # A live run's lock (this test's own process: alive, its heartbeat fresh) stops a convert: exit 75.
    (dst / LOCK).write_text(json.dumps({"token": "t", "host": socket.gethostname(), "pid": os.getpid(),
                                        "since": time.time(), "heartbeat": time.time(), "ttl": 60}))
    held = docembed(*args)
    assert held.returncode == 75 and "locked by another run" in held.stderr, held.stderr
    (dst / LOCK).unlink()
    assert "1 converted now, 1 already done" in ok(docembed(*args))
    assert manifest(dst)["status"] == "complete"


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["quantized source", "truncate to all", "same folder", "inside the source",
                                  "nothing to change", "other settings", "another output"])
def test_refusals(made, tmp_path, case):
    src = str(made["src"])
    args = {"quantized source": ["--output", str(made["cv_int8"]), "--to", str(tmp_path / "x"), "--output-dtype", "binary"],
            "truncate to all": ["--output", src, "--to", str(tmp_path / "x"), "--truncate-dim", "384"],
            "same folder": ["--output", src, "--to", src + "/", "--output-dtype", "int8"],
            "inside the source": ["--output", src, "--to", src + "/sub", "--output-dtype", "int8"],
            "nothing to change": ["--output", src, "--to", str(tmp_path / "x")],
            "other settings": ["--output", src, "--to", str(made["cv_int8"]), "--output-dtype", "binary"],
            "another output": ["--output", src, "--to", str(made["binary"]), "--output-dtype", "binary"]}[case]
    said = {"quantized source": "convert reads float32 outputs only", "truncate to all": "keep from 1 to 383",
            "same folder": "same folder", "inside the source": "same folder", "nothing to change": "already stores",
            "other settings": "other settings (output_dtype: 'int8' -> 'binary')",
            "another output": "written by `docembed run`, not a convert of"}[case]
    before = files(made["cv_int8"])
    done = docembed("convert", *args)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert done.stderr.startswith("docembed: error:") and len(done.stderr.strip().splitlines()) == 1
    assert files(made["cv_int8"]) == before
    assert not (made["src"] / "sub").exists()


@pytest.mark.unit
def test_the_target_fingerprint_is_the_sources_with_the_new_storage():
    source = {"model": "m", "model_revision": "r", "dim": 8, "max_seq_length": 16, "pooling": "mean",
              "normalize": True, "prefix": "", "text_column": "text", "output_dtype": "float32"}
    target = target_of(source, "binary", 4, "src")
    assert target.fingerprint() == {**source, "dim": 4, "truncate_dim": 4, "output_dtype": "binary",
                                    "long_docs": "truncate", "trust_remote_code": False}
    floats = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    floats /= np.linalg.norm(floats, axis=1, keepdims=True)
    cut = target.shrink(floats)
    assert cut.shape == (5, 4) and np.allclose(np.linalg.norm(cut, axis=1), 1, atol=1e-6)
    assert np.allclose(cut, floats[:, :4] / np.linalg.norm(floats[:, :4], axis=1, keepdims=True), atol=1e-6)
    # Refused: a float16 source, a cut that keeps every dimension, nothing to change, a cut of averaged
    # normalised windows (a run cuts each window before averaging).
    for fingerprint, dtype, dim in (({**source, "output_dtype": "float16"}, "int8", None), (source, "int8", 8),
                                    (source, "float32", None), ({**source, "long_docs": "mean"}, "int8", 4)):
        with pytest.raises(UsageError):
            target_of(fingerprint, dtype, dim, "src")
    # Not normalised, the average is linear in the windows: cutting it is cutting each.
    assert target_of({**source, "long_docs": "mean", "normalize": False}, "int8", 4, "src").dim == 4
