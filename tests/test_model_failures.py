"""Failures that are not the document's fail the unit: a model that fails on a known-good probe text
too, or on more of a unit's documents than --max-model-errors allows, commits nothing of that unit,
and a rerun retries it. Only documents that fail while the probe passes are rejected as model_error.
Nor are a GPU's own failures, injected here on the CPU: a CUDA error fails the unit at once, memory
short on one document is retried, and non-finite vectors are never committed (tests/test_gpu_paths.py
has the model loop's side of each)."""

import numpy as np
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
def test_more_model_errors_than_the_bound_fail_the_unit_and_fewer_are_rejected(tmp_path, tiny_window_model,
                                                                              monkeypatch):
    """The model fails on any input over 100 padded tokens, as a device short of memory fails on large
    inputs only: each long document fails even alone while the probe passes, so it is the document's
    failure, not a broken device. Half of a unit failing is past the default bound (1%); with the
    bound raised, exactly those documents are rejected."""
    monkeypatch.setenv("DOCEMBED_FAULT", "forward@*:raise>100")
    short = [f"doc {i}" for i in range(10)]
    long = [f"a much longer document number {i} " * 20 for i in range(10)]
    ids = [f"s{i}" for i in range(10)] + [f"l{i}" for i in range(10)]
    write_docs(tmp_path / "in.parquet", ids, short + long)
    argv = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), *FLAGS,
            "--model", tiny_window_model, "--min-batch-size", "4", "--max-batch-size", "8"]
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


def short_docs(path, count: int = 16, marked=()) -> tuple[list[str], list[str]]:
    """``count`` documents of one length (so batches are full), those in ``marked`` holding "overflow"."""
    ids = [f"d{i}" for i in range(count)]
    texts = [f"document number {i} about {'overflow' if i in marked else 'cats'}" for i in range(count)]
    write_docs(path, ids, texts)
    return ids, texts


def gpu_argv(tmp_path, model, output: str = "out") -> list[str]:
    return ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / output), "--no-progress",
            "--checkpoint-every", "8", "--model", model, "--max-seq-length", "64",
            "--min-batch-size", "4", "--max-batch-size", "4"]


@pytest.fixture
def unit_forwards(monkeypatch):
    """The forward passes units run, counted from 1 (DOCEMBED_FAULT's passages too): the canaries,
    probed through the same forward in each worker's setup, are left out."""
    import collections

    from docembed.model.embedder import Embedder
    from docembed.store import faults
    from docembed.transforms import embed

    calls = []
    original = Embedder.forward_with_norms
    monkeypatch.setattr(embed, "probe_canaries", lambda *args: None)
    monkeypatch.setattr(faults, "_passed", collections.Counter())
    monkeypatch.setattr(Embedder, "forward_with_norms",
                        lambda self, features: calls.append(1) or original(self, features))
    return calls


def assert_nothing_committed(out):
    assert OutputAdmin(str(out)).done_ids() == set()
    assert not list(out.glob("part-*")) and not (out / "_rejects").exists()


@pytest.mark.e2e
def test_a_cuda_error_fails_the_unit_at_once_and_rejects_nothing(tmp_path, tiny_window_model, unit_forwards,
                                                                  monkeypatch):
    """A device-side assert poisons the process's CUDA context: before, each document was tried alone
    and probed (about 2N failing forwards, then ModelFailed) and the broken model stayed shared."""
    from docembed.transforms import inference

    short_docs(tmp_path / "in.parquet")
    failures = inference.device_failures()
    monkeypatch.setenv("DOCEMBED_FAULT", "forward@*:raise=cuda")
    with pytest.raises(JobFailed, match=r"AcceleratorError: CUDA error: device-side assert triggered .*The CUDA "
                                        r"context is unusable .*this worker process must restart"):
        run(gpu_argv(tmp_path, tiny_window_model))
    assert len(unit_forwards) == 1
    assert inference.device_failures() == failures + 1  # the process's model is not handed out again
    assert_nothing_committed(tmp_path / "out")


@pytest.mark.e2e
def test_out_of_memory_on_one_document_is_retried_never_rejected(tmp_path, tiny_window_model, unit_forwards,
                                                                 monkeypatch):
    """Memory short for the first four forwards (a batch, its half, a document alone and its first
    retry): every document is embedded. Short for good on one document: the unit fails, and the
    document is not rejected (the memory may have been another batch's)."""
    from docembed.transforms import inference

    monkeypatch.setattr(inference, "OOM_RETRY_PAUSES_S", (0, 0, 0))
    short_docs(tmp_path / "in.parquet")
    monkeypatch.setenv("DOCEMBED_FAULT", ",".join(f"forward@{k}:raise=oom" for k in range(1, 5)))
    summary = run(gpu_argv(tmp_path, tiny_window_model))
    assert (summary["embedded"], summary["rejected"], summary["units_committed"]) == (16, 0, 2)

    write_docs(tmp_path / "in.parquet", ["short", "long"], ["cats", "a long document no memory holds " * 4])
    monkeypatch.setenv("DOCEMBED_FAULT", "forward@*:raise=oom>20")
    with pytest.raises(JobFailed, match=r"ran out of cpu memory on a single document even after 3 retries .*"
                                        r"smaller --max-batch-tokens or fewer harness threads"):
        run(gpu_argv(tmp_path, tiny_window_model, "out2"))
    assert_nothing_committed(tmp_path / "out2")


def overflowing_forward(monkeypatch, marked: str | None):
    """The forward pass returns NaN rows (inf norms) for inputs holding the word ``marked`` (every
    input when None), as fp16 overflow in a model trained in bf16 does."""
    from docembed.model.embedder import Embedder

    original = Embedder.forward_with_norms

    def overflowing(self, features):
        vectors, norms = original(self, features)
        rows = np.ones(len(vectors), bool)
        if marked:
            rows = (features["input_ids"] == self.encode([marked])[0][0]).any(1).numpy()
        vectors[rows], norms[rows] = np.nan, np.inf
        return vectors, norms

    monkeypatch.setattr(Embedder, "forward_with_norms", overflowing)


@pytest.mark.e2e
def test_non_finite_vectors_are_never_committed(tmp_path, tiny_window_model, monkeypatch):
    """Before, NaN vectors were committed and only `docembed verify` looked. NaN for a whole batch:
    the precision's fault, the unit fails naming its documents. NaN for some documents while the probe
    text is finite: they fail alone, rejected as model_error (within --max-model-errors)."""
    from docembed.transforms import embed

    monkeypatch.setattr(embed, "probe_canaries", lambda *args: None)  # the canaries would be NaN too
    short_docs(tmp_path / "in.parquet", marked=(2, 5))
    argv = gpu_argv(tmp_path, tiny_window_model)
    with monkeypatch.context() as patched:
        overflowing_forward(patched, None)
        with pytest.raises(JobFailed, match=r"non-finite vector \(NaN or inf\) from the model at precision fp32 "
                                            r"on cpu for all 4 documents of a batch; .*--precision bf16 or fp32\. "
                                            r"The unit is not committed \(documents d\d, d\d, d\d, d\d\)"):
            run(argv)
    assert_nothing_committed(tmp_path / "out")
    overflowing_forward(monkeypatch, "overflow")
    with pytest.raises(JobFailed, match=r"failed on 2 of the 8 documents .* non-finite vector"):
        run(argv)
    summary = run(argv + ["--max-model-errors", "0.5"])
    assert (summary["embedded"], summary["rejected"]) == (14, 2)
    rejected = pq.read_table(tmp_path / "out" / "_rejects").to_pylist()
    assert sorted(r["id"] for r in rejected) == ["d2", "d5"]
    assert all(r["reason"] == "model_error" and "at precision fp32" in r["message"] for r in rejected)
    assert all(np.isfinite(v).all() for v in by_id(read_output(tmp_path / "out")).values())
