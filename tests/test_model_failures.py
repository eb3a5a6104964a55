"""Failures that are not the document's fail the unit: a model that fails on a known-good probe text
too, or on more of a unit's documents than --max-model-errors allows, commits nothing of that unit,
and a rerun retries it. Only documents that fail while the probe passes are rejected as model_error."""

import pyarrow.parquet as pq
import pytest

from docembed.store.admin import OutputAdmin
from docembed.pipeline.run import run
from tests.conftest import by_id, cosine, read_output, write_docs
from docembed.errors import JobFailed

FLAGS = ["--no-progress", "--checkpoint-every", "20"]


@pytest.mark.e2e
def test_a_broken_model_or_device_fails_the_unit_and_a_rerun_after_the_fix_embeds_everything(
        tmp_path, docs, reference_model, monkeypatch):
    """The forward pass raises on every batch, as a GPU with Xid errors or a wrong driver would: every
    document fails alone and so does the probe. Before, all 40 were rejected and the run exited 0."""
    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:40], texts[:40])
    argv = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), *FLAGS]
    monkeypatch.setenv("DOCEMBED_FAULT", "forward@*:raise")
    with pytest.raises(JobFailed, match="the model fails on a known-good probe text too .*fault injected at forward"):
        run(argv)
    assert OutputAdmin(str(tmp_path / "out")).done_ids() == set()  # nothing of either unit committed
    assert not list((tmp_path / "out").glob("part-*")) and not (tmp_path / "out" / "_rejects").exists()
    monkeypatch.delenv("DOCEMBED_FAULT")  # the device is fixed
    summary = run(argv)
    assert (summary["embedded"], summary["rejected"], summary["units_committed"]) == (40, 0, 2)
    got = by_id(read_output(tmp_path / "out"))
    assert cosine(got[ids[0]], reference_model.encode([texts[0]])[0]) >= 0.9999


@pytest.mark.e2e
def test_more_model_errors_than_the_bound_fail_the_unit_and_fewer_are_rejected(tmp_path, tiny_model):
    """The tiny model fails on documents over 16 tokens while the probe (under 16) passes: each such
    document is the model's limit, not a broken device. Half of a unit failing is past the default
    bound (1%); with the bound raised, exactly those documents are rejected."""
    short = [f"doc {i}" for i in range(10)]
    long = [f"a much longer document number {i} " * 4 for i in range(10)]
    ids = [f"s{i}" for i in range(10)] + [f"l{i}" for i in range(10)]
    write_docs(tmp_path / "in.parquet", ids, short + long)
    argv = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), *FLAGS,
            "--model", tiny_model, "--max-seq-length", "64", "--min-batch-size", "4", "--max-batch-size", "8"]
    with pytest.raises(JobFailed, match=r"failed on 10 of the 20 documents of unit \w+ .* more than "
                                        r"--max-model-errors 0.01 allows \(1\)"):
        run(argv)
    assert OutputAdmin(str(tmp_path / "out")).done_ids() == set()
    summary = run(argv + ["--max-model-errors", "0.5"])
    assert (summary["embedded"], summary["rejected"]) == (10, 10)
    rejected = pq.read_table(tmp_path / "out" / "_rejects").to_pylist()
    assert sorted(r["id"] for r in rejected) == sorted(ids[10:])
    assert {r["reason"] for r in rejected} == {"model_error"}


@pytest.mark.e2e
def test_retry_rejects_moves_rows_from_the_rejections_into_the_output_once_the_cause_is_fixed(
        tmp_path, docs, monkeypatch, capsys):
    """A device that fails on any batch over 60 padded tokens, as one short of memory would: short
    documents get through one by one, the long ones are rejected as model_error. With the device fixed,
    --retry-rejects model_error embeds exactly those, through the same atomic commit, and the output
    equals an uninterrupted run's."""
    from docembed.cli import main
    from docembed.pipeline.admin.verify import verify

    ids, texts = docs
    short = [t for t in texts if len(t) < 60][:20]
    long = sorted(texts, key=len)[-4:]  # the four longest: each over 60 tokens alone
    chosen_ids = [f"s{i}" for i in range(len(short))] + [f"l{i}" for i in range(len(long))]
    write_docs(tmp_path / "in.parquet", chosen_ids, short + long)
    argv = ["--input", str(tmp_path / "in.parquet"), *FLAGS, "--checkpoint-every", "100"]
    run(argv + ["--output", str(tmp_path / "reference")])
    monkeypatch.setenv("DOCEMBED_FAULT", "forward@*:raise>60")
    first = run(argv + ["--output", str(tmp_path / "out"), "--max-model-errors", "0.3"])
    assert (first["embedded"], first["rejected"], first["rejected_by_reason"]) == (len(short), 4, {"model_error": 4})
    monkeypatch.delenv("DOCEMBED_FAULT")

    assert main(["run", *argv, "--output", str(tmp_path / "out"), "--retry-rejects", "model_error"]) == 0
    printed = capsys.readouterr().out
    assert "retried    4 rejected rows (model_error) of 1 unit: 4 embedded now, 0 rejected again" in printed
    assert f"accounted  {len(chosen_ids)} input rows = {len(chosen_ids)} embedded + 0 rejected" in printed
    out = tmp_path / "out"
    assert not list((out / "_rejects").glob("*.parquet")) and len(list(out.glob("part-*-retry-1.parquet"))) == 1
    assert verify(str(out), str(tmp_path / "in.parquet")).problems == []
    got, want = by_id(read_output(out)), by_id(read_output(tmp_path / "reference"))
    assert sorted(got) == sorted(want) == sorted(chosen_ids)
    assert min(cosine(got[i], want[i]) for i in want) >= 0.9999
    again = run(argv + ["--output", str(out), "--retry-rejects", "model_error"])
    assert again["retried"] == {} and again["units_committed"] == 0  # nothing left to retry


@pytest.mark.unit
def test_retry_rejects_refuses_reasons_that_are_the_inputs(tmp_path, capsys):
    from docembed.cli import main

    assert main(["run", "--input", "jobs/sample/docs.parquet", "--output", str(tmp_path / "o"),
                 "--retry-rejects", "empty_text,model_error"]) == 2
    assert "--retry-rejects empty_text: only duplicate_id, model_error, unreadable_file can turn out otherwise" in \
        capsys.readouterr().err
