"""The GPU's failure paths, run on the CPU: the errors a CUDA device raises are injected (faults'
``raise=cuda`` and ``raise=oom``: torch builds both on a CPU build) or the forward pass is wrapped to
return NaN rows, and the model loop (``inference``) must treat each as the GPU needs: a poisoned CUDA
context fails at once and drops the process's model; memory short on one document is retried, never
rejected; non-finite vectors never reach a commit. Also: the per-unit GPU peak is reset where CUDA is in
use and the CPU path never calls into CUDA; stop requests and progress are handled off the model loop."""

import collections
import threading
import time

import numpy as np
import pytest
import torch

from docembed.errors import DeviceFailed, ModelFailed, NonFiniteVectors, UnitAbandoned
from docembed.model.embedder import Embedder
from docembed.store import faults
from docembed.transforms import commit, embed, inference
from tests.conftest import bare_settings

SHORT = [f"document number {i} about cats" for i in range(8)]  # all of one length: two batches of four


@pytest.fixture(scope="module")
def embedder(tiny_window_model):
    return Embedder(tiny_window_model, "cpu", "fp32", None, 64)


@pytest.fixture
def forwards(embedder, monkeypatch):
    """The padded sizes of each forward pass the embedder runs, in order (the probe's included)."""
    calls = []
    original = embedder.forward_with_norms

    def counted(features):
        calls.append(int(features["input_ids"].numel()))
        return original(features)

    monkeypatch.setattr(embedder, "forward_with_norms", counted)
    return calls


@pytest.fixture
def fault(monkeypatch):
    """Arm DOCEMBED_FAULT, counting this test's passages from 1."""
    def arm(spec: str):
        monkeypatch.setattr(faults, "_passed", collections.Counter())
        monkeypatch.setenv("DOCEMBED_FAULT", spec)
    return arm


def settings(tmp_path, size=4):
    return bare_settings(str(tmp_path), min_batch_size=size, max_batch_size=size, max_batch_tokens=4096)


@pytest.mark.unit
@pytest.mark.parametrize("error, fatal, memory", [
    (torch.AcceleratorError("CUDA error: device-side assert triggered"), True, False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True, False),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False, True),
    (RuntimeError("CUDA error: out of memory"), False, True),
    (IndexError("index out of range in self"), False, False),
])
def test_device_errors_are_told_apart(error, fatal, memory):
    assert (inference.is_device_fatal(error), inference.is_out_of_memory(error)) == (fatal, memory)


@pytest.mark.unit
def test_a_cuda_error_fails_the_unit_at_once_after_one_forward(tmp_path, embedder, forwards, fault):
    """Before, each of the 8 documents was tried alone and probed (about 2N failing forwards) and the
    broken model stayed in the process's shared handle for Beam's retries."""
    fault("forward@*:raise=cuda")
    before = inference.device_failures()
    with pytest.raises(DeviceFailed, match=r"AcceleratorError: CUDA error: device-side assert triggered .*"
                                           r"The CUDA context is unusable .* this worker process must restart"):
        inference.embed_rows(embedder, SHORT, settings(tmp_path))
    assert len(forwards) == 1
    assert inference.device_failures() == before + 1


@pytest.mark.unit
def test_a_cuda_error_on_the_probe_is_fatal_too(tmp_path, embedder, forwards, fault):
    """A document fails alone (an ordinary error), then the probe meets the poisoned context."""
    fault("forward@1:raise,forward@2:raise,forward@3:raise=cuda")
    with pytest.raises(DeviceFailed, match="CUDA context is unusable"):
        inference.embed_rows(embedder, SHORT[:1], settings(tmp_path, 1))
    assert len(forwards) == 3  # the batch, the document alone, the probe: nothing after


@pytest.mark.unit
def test_the_shared_model_is_loaded_again_after_a_device_failure(tmp_path, monkeypatch):
    class Loaded:  # the shared handle holds weak references: a plain object() cannot be held
        pass

    monkeypatch.setattr(embed, "load_embedder", lambda settings, resolved: Loaded())
    unit_settings, resolved = bare_settings(str(tmp_path)), {"device": "cuda", "precision": "fp16"}
    first = embed.acquire_embedder(unit_settings, resolved)
    assert embed.acquire_embedder(unit_settings, resolved) is first  # one model per process
    monkeypatch.setattr(inference, "_device_failures", inference.device_failures() + 1)
    assert embed.acquire_embedder(unit_settings, resolved) is not first


@pytest.mark.unit
def test_a_document_out_of_memory_is_retried_until_it_fits_and_nothing_is_rejected(
        tmp_path, embedder, forwards, fault, monkeypatch):
    """The first four forwards run out of memory: the batch of four, its half, the first document
    alone and its first retry; the second retry fits, and the rest go on."""
    monkeypatch.setattr(inference, "OOM_RETRY_PAUSES_S", (0, 0, 0))
    clean = inference.embed_rows(embedder, SHORT, settings(tmp_path))
    forwards.clear()
    fault(",".join(f"forward@{k}:raise=oom" for k in range(1, 5)))
    got = inference.embed_rows(embedder, SHORT, settings(tmp_path))
    assert got.failed == {}
    assert len(forwards) == 8  # 4 failed + the retry that fits, its half's other document, the other half, batch 2
    np.testing.assert_allclose(got.vectors, clean.vectors, atol=1e-5)


@pytest.mark.unit
def test_a_document_that_never_fits_fails_the_unit_rather_than_being_rejected(
        tmp_path, embedder, forwards, fault, monkeypatch):
    monkeypatch.setattr(inference, "OOM_RETRY_PAUSES_S", (0, 0, 0))
    texts = SHORT[:3] + ["a long document that no memory holds " * 5]
    long_size = len(embedder.encode(texts[3:])[0]) + embedder.overhead
    fault(f"forward@*:raise=oom>{long_size - 1}")
    with pytest.raises(ModelFailed, match=r"ran out of cpu memory on a single document even after 3 retries .*"
                                          r"not rejected.* smaller --max-batch-tokens or fewer harness threads"):
        inference.embed_rows(embedder, texts, settings(tmp_path, 1))
    assert forwards.count(long_size) == 2 + 3  # the batch, the document alone, then the 3 retries
    assert probe_size(embedder) not in forwards  # memory short is no document's fault: nothing probed


def probe_size(embedder) -> int:
    return len(embedder.encode([inference.PROBE])[0]) + embedder.overhead


def nan_rows(embedder, monkeypatch, marked):
    """Make the forward pass return NaN for the rows holding the token ``marked`` (any row when None),
    as fp16 overflow does on some inputs."""
    original = embedder.forward_with_norms
    token = embedder.encode([marked])[0][0] if marked else None

    def overflowing(features):
        vectors, norms = original(features)
        rows = (features["input_ids"] == token).any(1).numpy() if token else np.ones(len(vectors), bool)
        vectors[rows], norms[rows] = np.nan, np.inf
        return vectors, norms

    monkeypatch.setattr(embedder, "forward_with_norms", overflowing)


@pytest.mark.unit
def test_documents_with_non_finite_vectors_fail_alone_when_the_probe_is_finite(tmp_path, embedder, monkeypatch):
    texts = [f"document number {i} about {'overflow' if i in (2, 5) else 'cats'}" for i in range(8)]
    nan_rows(embedder, monkeypatch, "overflow")
    got = inference.embed_rows(embedder, texts, settings(tmp_path))
    assert sorted(got.failed) == [2, 5]
    assert all("non-finite vector (NaN or inf) from the model at precision fp32 on cpu" in m and
               "--precision bf16 or fp32" in m for m in got.failed.values())
    assert np.isfinite(got.vectors).all() and np.isfinite(got.norms).all()
    assert not got.vectors[[2, 5]].any()


@pytest.mark.unit
@pytest.mark.parametrize("texts, size, where", [
    (SHORT, 4, "for all 4 documents of a batch"),
    (SHORT[:1], 1, "for 1 of a batch's 1 documents and for the probe text too"),
])
def test_non_finite_vectors_of_a_whole_batch_or_the_probe_fail_at_once(tmp_path, embedder, monkeypatch,
                                                                       texts, size, where):
    nan_rows(embedder, monkeypatch, None)
    with pytest.raises(NonFiniteVectors, match=f"precision fp32 on cpu {where}; .*--precision bf16 or fp32") as raised:
        inference.embed_rows(embedder, texts, settings(tmp_path, size))
    assert sorted(raised.value.rows) == list(range(size))


class Recorder:
    """Stands in for torch.cuda's calls: records each, with its thread."""

    def __init__(self, monkeypatch, initialized: bool):
        self.calls = []
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
        for name in ("reset_peak_memory_stats", "max_memory_allocated", "empty_cache", "synchronize"):
            monkeypatch.setattr(torch.cuda, name, self._record(name))

    def _record(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            return 3 * 2**20
        return call


@pytest.mark.unit
def test_the_gpu_peak_is_reset_per_unit_only_where_cuda_is_in_use(monkeypatch):
    class Model:
        device = "cpu"

    cuda = Recorder(monkeypatch, initialized=False)
    embed.reset_device_peak(Model())
    assert "gpu_peak_mib" not in commit.worker_stats()
    assert cuda.calls == []  # the CPU path never calls into CUDA
    Model.device = "cuda"
    embed.reset_device_peak(Model())
    assert cuda.calls == ["reset_peak_memory_stats"]
    Recorder(monkeypatch, initialized=True)
    assert commit.worker_stats()["gpu_peak_mib"] == 3.0


@pytest.mark.unit
def test_the_cpu_path_of_the_model_loop_never_calls_into_cuda(tmp_path, embedder, fault, monkeypatch):
    """Failures included: a batch split in halves releases memory only on CUDA."""
    cuda = Recorder(monkeypatch, initialized=False)
    fault("forward@1:raise")
    assert inference.embed_rows(embedder, SHORT, settings(tmp_path)).failed == {}
    assert cuda.calls == []


class Output:
    """A store's stop request and progress, recording which thread asked."""

    def __init__(self, deadline=None, error=None):
        self.deadline, self.error = deadline, error
        self.threads, self.progress = set(), []

    def stop_deadline(self):
        self.threads.add(threading.current_thread())
        if self.error:
            raise self.error
        return self.deadline

    def write_progress(self, unit_id, docs, total, text_bytes=0):
        self.threads.add(threading.current_thread())
        self.progress.append(docs)


class Rows:
    class unit:  # stands in for a WorkUnit
        unit_id, rows, text_bytes = "u1", 10, 100

    class rejects:  # stands in for the unit's rejections table
        num_rows = 2


def watch_batches(output, batches=200, pause=0.002):
    with embed.UnitWatch(output, Rows()) as watch:
        for done in range(1, batches + 1):
            watch.after_batch(done)
            time.sleep(pause)


@pytest.mark.unit
def test_stop_checks_and_progress_run_off_the_model_loop(monkeypatch):
    monkeypatch.setattr(embed, "STOP_CHECK_S", 0.01)
    monkeypatch.setattr(embed, "PROGRESS_EVERY_S", 0.05)
    output = Output()
    watch_batches(output)
    assert threading.current_thread() not in output.threads and output.threads
    assert output.progress and output.progress == sorted(output.progress)
    assert all(3 <= docs <= 202 for docs in output.progress)  # documents done + the unit's rejections
    output = Output(deadline=time.time() - 1)
    with pytest.raises(UnitAbandoned):
        watch_batches(output)
    output = Output(error=OSError(5, "Input/output error"))
    with pytest.raises(OSError, match="Input/output error"):  # as a check on the model loop would have
        watch_batches(output)


@pytest.mark.unit
def test_an_accelerator_takes_a_unit_in_sorted_blocks_with_the_same_results(tmp_path, embedder, forwards,
                                                                           monkeypatch):
    """On an accelerator the unit is tokenized, sorted and batched block by block, the next block
    tokenized beside the model: every vector, count and dropped token is what the whole-unit path
    gives, no batch mixes two blocks, and progress counts the unit's documents."""
    texts = [("word " * (3 + (i * 7) % 90)) + f"doc {i}" for i in range(23)]
    whole = inference.embed_rows(embedder, texts, settings(tmp_path))
    assert whole.dropped and whole.truncated  # some texts exceed the 64-token window
    whole_forwards = len(forwards)
    monkeypatch.setattr(Embedder, "frees_host", property(lambda self: True))
    monkeypatch.setattr(inference, "FIRST_BLOCK", 2)
    monkeypatch.setattr(inference, "SORT_BLOCK", 5)
    assert [(b.start, b.stop) for b in inference.sort_blocks(23, True)] == \
        [(0, 2), (2, 6), (6, 11), (11, 16), (16, 21), (21, 23)]  # doubling from 2 up to 5
    assert inference.sort_blocks(23, False) == [range(0, 23)]
    sizes, progress = [], []
    original = embedder.prepare_ids

    def seen(windows):
        sizes.append(len(windows))
        return original(windows)

    monkeypatch.setattr(embedder, "prepare_ids", seen)
    blocked = inference.embed_rows(embedder, texts, settings(tmp_path), progress.append)
    np.testing.assert_allclose(blocked.vectors, whole.vectors, atol=1e-5)
    assert (blocked.truncated, blocked.tokens, blocked.text_tokens, blocked.dropped, blocked.failed) == \
        (whole.truncated, whole.tokens, whole.text_tokens, whole.dropped, whole.failed)
    np.testing.assert_array_equal(blocked.doc_tokens, whole.doc_tokens)
    # Batches of at most 4 never mix blocks: 2 | 4 | 4 + 1 | 4 + 1 | 4 + 1 | 2.
    assert sorted(sizes[2:4]) == [1, 4] and sizes[:2] == [2, 4] and blocked.batches == 9
    assert len(forwards) - whole_forwards == 9
    assert progress[:2] == [2, 6] and progress[3::2] == [11, 16, 21] and progress[-1] == 23
    assert sum(d for d, *_ in blocked.batch_stats) == len(texts)
