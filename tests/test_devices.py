"""The CUDA path, checked on a machine without a GPU: what would go wrong on a device other than the
CPU, run through the same code on the CPU or on torch's ``meta`` device.

- pooling creates every tensor on its inputs' device (a CPU tensor per batch would fail on CUDA, or
  copy to it every batch), and keeps sentence-transformers' vectors;
- the model is loaded at the precision asked (cast before it is moved, so a model that fits at fp16
  need not fit at fp32 first);
- fp32 means true fp32 (no TF32), and the numerics record says so;
- a window above the model's position table is refused on the launcher (on CUDA the overflow is a
  device-side assert that poisons the process);
- a missing CUDA device is explained: a CPU build of torch, or a driver too old for torch's CUDA.
"""

from __future__ import annotations

import pytest

from docembed.model.stack import POOLING_MODES, pool

pytestmark = pytest.mark.unit

HIDDEN = 8


def _inputs(device: str, left: bool, dtype=None):
    """(token embeddings (3, 6, HIDDEN), mask) with rows of 6, 4 and 2 tokens, padded on the left or right."""
    import torch

    torch.manual_seed(0)
    tokens = torch.randn(3, 6, HIDDEN, dtype=dtype or torch.float32)
    mask = torch.zeros(3, 6, dtype=torch.int64)
    for row, size in enumerate((6, 4, 2)):
        if left:
            mask[row, 6 - size:] = 1
        else:
            mask[row, :size] = 1
    return tokens.to(device), mask.to(device)


def _only_on(device: str):
    """A torch function mode that fails any call that takes or makes a tensor off ``device``: a CPU
    tensor made per batch beside CUDA inputs (an error, or a host-to-device copy every batch)."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_flatten

    class OnlyOn(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in tree_flatten((args, kwargs, out))[0]:
                if isinstance(value, torch.Tensor) and value.device.type != device:
                    raise AssertionError(f"{getattr(func, '__name__', func)} met a tensor on {value.device}")
            return out

    return OnlyOn()


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("prompt_length", [0, 1], ids=["with-prompt", "prompt-left-out"])
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_makes_every_tensor_on_its_inputs_device(mode, prompt_length, left):
    """On ``meta``, a CPU tensor met is an error, as it is on CUDA; the mode also fails what torch
    would copy silently (CPU index tensors)."""
    tokens, mask = _inputs("meta", left)
    with _only_on("meta"):
        pooled = pool(mode, tokens, mask, prompt_length)
    assert pooled.shape == (3, HIDDEN) and pooled.device.type == "meta"


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("prompt_length", [0, 1], ids=["with-prompt", "prompt-left-out"])
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_equals_sentence_transformers_pooling(mode, prompt_length, left):
    """The same vectors as sentence-transformers' own Pooling module, left padding and a prompt left
    out included (tests/test_modules.py checks whole models, right-padded)."""
    import torch
    from sentence_transformers.sentence_transformer.modules import Pooling

    tokens, mask = _inputs("cpu", left)
    reference = Pooling(HIDDEN, mode, include_prompt=not prompt_length)
    features = {"token_embeddings": tokens, "attention_mask": mask, "prompt_length": prompt_length}
    expected = reference(features)["sentence_embedding"]
    torch.testing.assert_close(pool(mode, tokens, mask, prompt_length), expected, rtol=1e-6, atol=1e-6)


# --- loading at the precision asked -------------------------------------------------------------------

TEXTS = ["A short one.", "Mixed CASE Words and Ünïcode, with a longer tail " * 6,
         "Der schnelle braune Fuchs springt über den faulen Hund.", "敏捷的棕色狐狸", "x"]
WINDOW = 64


@pytest.fixture(scope="module")
def xlmr(tmp_path_factory) -> str:
    """A tiny XLM-RoBERTa (position table of WINDOW + 2, pad id 1) with mean pooling, a Dense layer and
    normalisation: a module after the transformer that has weights of its own."""
    from tests import tiny_models

    root = tmp_path_factory.mktemp("xlmr")
    base = tiny_models.xlm_roberta(root / "base", window=WINDOW)
    return tiny_models.sentence_transformers_folder(
        root / "st", base, WINDOW, lambda m: [m.Pooling(tiny_models.HIDDEN, "mean"),
                                              m.Dense(tiny_models.HIDDEN, 16), m.Normalize()])


def _floating(module) -> set:
    import itertools

    return {t.dtype for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()}


def test_the_model_is_cast_before_it_is_moved_to_the_device(xlmr, monkeypatch):
    """Every module reaches the device already at the precision asked, so a GPU never holds the fp32
    model. ``meta`` stands in for the GPU: moving there is recorded with the module's dtypes then."""
    import torch

    from docembed.model.embedder import Embedder

    moves, to = [], torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and device.type == "meta":
            moves.append((type(module).__name__, _floating(module)))
        return to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    embedder = Embedder(xlmr, "meta", "bf16", None)
    assert {name for name, _ in moves} >= {"XLMRobertaModel", "_Pooling", "_Dense"}
    assert all(dtypes <= {torch.bfloat16} for _, dtypes in moves), moves
    for module in (embedder.model, *embedder.after):
        assert _floating(module) <= {torch.bfloat16}
        assert {p.device.type for p in module.parameters()} <= {"meta"}


def test_bf16_is_loaded_as_bf16_and_keeps_fp32_vectors(xlmr):
    import numpy as np
    import torch

    from docembed.model.embedder import Embedder
    from docembed.model.numerics import cpu_has_native_bf16

    bf16 = Embedder(xlmr, "cpu", "bf16", None)
    assert _floating(bf16.model) == {torch.bfloat16}
    assert all(_floating(module) <= {torch.bfloat16} for module in bf16.after)
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (docembed offers bf16 on the CPU only with it)")
    fp32 = Embedder(xlmr, "cpu", "fp32", None)
    assert _floating(fp32.model) == {torch.float32}
    got, expected = bf16.embed(TEXTS), fp32.embed(TEXTS)
    assert got.dtype == np.float32
    assert ((got * expected).sum(1) >= 0.99).all()  # both normalised


def test_int8_is_still_read_in_fp32_and_quantized(xlmr):
    import torch

    from docembed.model.embedder import Embedder
    from docembed.model.quantize import KEEP_FP32

    embedder = Embedder(xlmr, "cpu", "int8", None)
    modules = dict(embedder.model.named_modules())
    assert type(modules[KEEP_FP32]) is torch.nn.Linear and modules[KEEP_FP32].weight.dtype == torch.float32
    assert isinstance(modules["encoder.layer.0.attention.self.query"], torch.ao.nn.quantized.dynamic.Linear)
    assert all(_floating(module) <= {torch.float32} for module in embedder.after)


# --- fp32 is true fp32 ----------------------------------------------------------------------------------

@pytest.fixture
def tf32_on():
    """TF32 turned on, as another library or TORCH_ALLOW_TF32_CUBLAS_OVERRIDE may; torch's defaults after."""
    import torch

    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True


def test_resolving_turns_tf32_off_and_records_it(tf32_on):
    import torch

    from docembed.model import numerics

    assert numerics.tf32_in_use()
    record = numerics.resolve("cpu", "fp32")
    assert record["tf32"] is False and not numerics.tf32_in_use()
    assert torch.get_float32_matmul_precision() == "highest"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    # Outputs pinned before the record had the key compare as before: device and precision only.
    older = {k: v for k, v in record.items() if k != "tf32"}
    assert numerics.same(record, older) and numerics.same(older, record)
    assert not numerics.same(record, dict(record, precision="bf16"))


def test_an_embedder_made_without_resolving_turns_tf32_off_too(xlmr, tf32_on):
    from docembed.model import numerics
    from docembed.model.embedder import Embedder

    Embedder(xlmr, "cpu", "fp32", None)
    assert not numerics.tf32_in_use()


# --- a window the position table cannot hold ------------------------------------------------------------

def test_a_window_past_a_roberta_style_position_table_is_refused_on_the_launcher(xlmr):
    """XLM-R's table of WINDOW + 2 rows holds WINDOW tokens: its position ids start after the pad id."""
    from docembed.errors import UsageError
    from docembed.model.card import describe_model

    assert describe_model(xlmr, WINDOW).max_seq_length == WINDOW
    with pytest.raises(UsageError, match=rf"--max-seq-length {WINDOW + 1} is more than the model in .* can take: "
                                         rf"its position table holds {WINDOW} tokens \(max_position_embeddings "
                                         rf"{WINDOW + 2}, less 2 rows its position ids skip\); use --max-seq-length "
                                         rf"{WINDOW} or less"):
        describe_model(xlmr, WINDOW + 1)


def test_a_window_past_a_bert_position_table_is_refused_and_the_default_fits(tmp_path):
    from docembed.errors import ModelError, UsageError
    from docembed.model.card import describe_model
    from tests import tiny_models

    base = tiny_models.bert(tmp_path / "bert", tiny_models.wordpiece_tokenizer(), positions=32)
    assert describe_model(base).max_seq_length == 32  # the tokenizer's limit, capped at the table
    assert describe_model(base, 32).max_seq_length == 32
    with pytest.raises(UsageError, match=r"--max-seq-length 33 .* holds 32 tokens; use --max-seq-length 32 or less"):
        describe_model(base, 33)
    (base / "sentence_bert_config.json").write_text('{"max_seq_length": 40}')
    with pytest.raises(ModelError, match=r"the window of 40 tokens its sentence_bert_config.json sets .* holds 32"):
        describe_model(base)
    assert describe_model(base, 16).max_seq_length == 16  # asked for less: the folder's own is not used


def test_the_run_refuses_the_window_before_any_work(xlmr, tmp_path, capsys):
    from docembed.cli import main
    from tests.conftest import write_docs

    write_docs(tmp_path / "in.parquet", ["a"], ["one"])
    code = main(["run", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--model", xlmr,
                 "--max-seq-length", str(WINDOW + 2), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out").exists(), err
    assert err.count("docembed: error:") == 1 and f"its position table holds {WINDOW} tokens" in err


# --- why torch sees no CUDA device ----------------------------------------------------------------------

@pytest.mark.parametrize("driver, cuda, expected", [
    (None, None, "this worker's torch is a CPU build"),
    ("535.104.05", None, "this worker's torch is a CPU build"),
    (None, "12.8", "no NVIDIA driver was found on this worker"),
    ("535.104.05", "13.0", ("torch's CUDA 13.0 needs NVIDIA driver 580 or newer, and this worker's driver is "
                            "535.104.05: update the driver, or install a torch build for an older CUDA")),
    ("470.256.02", "12.6", "torch's CUDA 12.6 needs NVIDIA driver 525.60.13 or newer"),
    ("525.60.2", "12.1", "needs NVIDIA driver 525.60.13 or newer"),  # numbers, not strings: 2 < 13
    ("525.60.13", "12.1", None),
    ("525.105.17", "12.4", None),  # 105 > 60 as numbers, though not as strings
    ("580.65.06", "13.0", None),
    ("450.51.06", "99.0", None),  # a CUDA the table does not know: no claim made
])
def test_the_driver_and_torch_build_explain_a_missing_cuda_device(driver, cuda, expected):
    from docembed.model.numerics import driver_problem

    found = driver_problem(driver, cuda)
    assert found == expected if expected is None else expected in found


@pytest.mark.parametrize("text, version", [
    (("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
      "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"), "535.104.05"),
    (("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
      "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 07:09:48 UTC 2025\n"), "580.65.06"),
])
def test_the_driver_version_is_read_from_the_kernel_module(tmp_path, monkeypatch, text, version):
    from docembed.model import numerics

    (tmp_path / "version").write_text(text)
    monkeypatch.setattr(numerics, "_DRIVER_FILE", str(tmp_path / "version"))
    assert numerics.installed_driver() == version
    monkeypatch.setattr(numerics, "_DRIVER_FILE", str(tmp_path / "missing"))
    monkeypatch.setattr(numerics.shutil, "which", lambda name: None)
    assert numerics.installed_driver() is None


def test_a_cpu_build_of_torch_says_so_when_cuda_is_asked():
    import torch

    from docembed.errors import DeviceUnavailable
    from docembed.model.numerics import resolve

    if torch.cuda.is_available() or torch.version.cuda:
        pytest.skip("this torch is a CUDA build")
    with pytest.raises(DeviceUnavailable, match=r"torch sees no CUDA device on this worker \(torch .*, CUDA build: "
                                                r"None\): this worker's torch is a CPU build .*; docembed never falls"):
        resolve("cuda", "auto")


# --- auto precision for a model saved in bf16 -----------------------------------------------------------

@pytest.mark.parametrize("device, trained, native_bf16, expected", [
    ("cpu", "bfloat16", True, "fp32"),
    ("cuda", None, True, "fp16"),
    ("cuda", "float32", True, "fp16"),
    ("cuda", "bfloat16", False, "fp16"),  # a GPU without native bf16 (T4, V100): fp16 as before
    ("cuda", "bfloat16", True, "bf16"),
])
def test_auto_precision_is_bf16_on_cuda_only_for_a_model_saved_in_bf16(device, trained, native_bf16, expected):
    from docembed.model.numerics import auto_precision

    assert auto_precision(device, trained, native_bf16) == expected


def test_the_dtype_a_model_was_saved_in_is_read_from_its_configuration(xlmr, tmp_path):
    import json
    import shutil

    from docembed.model.card import ModelFolder
    from docembed.model.numerics import resolve

    assert ModelFolder.read(xlmr).trained_dtype == "float32"
    folder = tmp_path / "bf16"
    shutil.copytree(xlmr, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(dict(config, torch_dtype="bfloat16")))  # as transformers 4 saved it
    trained = ModelFolder.read(folder).trained_dtype
    assert trained == "bfloat16"
    assert resolve("cpu", "auto", trained)["precision"] == "fp32"
