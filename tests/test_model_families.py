"""Model families beyond BERT: docembed runs each as sentence-transformers runs it.

docembed never imports sentence-transformers to embed: it reads a model folder's module stack itself,
runs the transformer through transformers' ``AutoModel`` and builds each window's token ids from the
special tokens it locates (``card.special_layout``). Each of those steps depends on the family: the
tokenizer's kind and specials (``<s> ... </s>`` and ``<pad>`` = 1 for XLM-R and MPNet, not BERT's
``[CLS] ... [SEP]``), which inputs the model takes (MPNet and XLM-R no token_type_ids), prompts that eat
into the window, Matryoshka truncation of a model that does not normalise, and architectures whose code
ships in the model folder. So for a tiny random-weight model of each family (``tests/tiny_models.py``),
``Embedder``'s vectors must equal ``SentenceTransformer(folder).encode``'s (cosine >= 0.9999), and
``describe_model`` (the launcher's view, from configuration files alone) must equal the loaded model's card.

Covered elsewhere, and not repeated here: BERT with every pooling mode, Dense and Normalize
(``tests/test_modules.py``), the real all-MiniLM-L6-v2 end to end (``tests/test_embed_e2e.py``), a
normalising Matryoshka model with a query prompt and a BERT subclass behind ``--trust-remote-code``
(``tests/test_modules.py``). docs/MODELS.md lists which test covers which family.
"""

from __future__ import annotations

import numpy as np
import pytest

from docembed.errors import ModelError
from docembed.model.card import describe_model, special_layout
from docembed.model.embedder import Embedder
from docembed.pipeline.settings import prompt_text
from tests import tiny_models

pytestmark = pytest.mark.unit

WINDOW = 64
# Several scripts; one text longer than the window (truncated alike by both); leading and inner runs of
# whitespace, which a Metaspace tokenizer turns into tokens of their own. No empty text: the pipeline
# rejects those (empty_text) before the model.
TEXTS = ["A short one.", "Mixed CASE Words and Ünïcode, with a longer tail " * 6,
         "Der schnelle braune Fuchs springt über den faulen Hund.", "Быстрая коричневая лиса", "敏捷的棕色狐狸",
         "  two leading spaces and  two  inner", "x"]
BGE_QUERY = "Represent this sentence for searching relevant passages: "


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _reference(folder: str, **kwargs):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(folder, device="cpu", **kwargs)


def _assert_same_vectors(ours: Embedder, reference, **encode) -> np.ndarray:
    got, expected = ours.embed(TEXTS), reference.encode(TEXTS, **encode)
    assert got.shape == expected.shape
    pairs = np.triu_indices(len(TEXTS), 1)
    apart = _cosines(expected[pairs[0]], expected[pairs[1]]).max()
    assert apart < 0.999, f"the model gives different texts vectors at cosine {apart:.6f}: too alike to compare"
    worst = _cosines(got, expected).min()
    assert worst >= 0.9999, f"cosine to sentence-transformers' vectors falls to {worst:.6f}"
    return got


def _assert_card_is_the_loaded_models(folder: str, ours: Embedder, reference, prefix: str = "",
                                      truncate_dim: int | None = None) -> None:
    card = describe_model(folder, None, prefix, truncate_dim)
    assert card == ours.card()
    assert (card.dim, card.max_seq_length) == (reference.get_embedding_dimension(), reference.max_seq_length)


@pytest.fixture(scope="module")
def xlmr(tmp_path_factory):
    return tiny_models.xlm_roberta(tmp_path_factory.mktemp("xlmr"), WINDOW)


@pytest.fixture(scope="module")
def mpnet(tmp_path_factory):
    return tiny_models.mpnet(tmp_path_factory.mktemp("mpnet"), WINDOW)


@pytest.fixture(scope="module")
def bert(tmp_path_factory, reference_model):
    """A BERT with MiniLM's tokenizer (conftest's tiny BERT gives CLS vectors too alike: tests/tiny_models.py)."""
    return tiny_models.bert(tmp_path_factory.mktemp("bert"), reference_model.tokenizer)


# Family: (base model fixture, the modules after the transformer). Each is the stack of a real model:
MEAN = lambda m: [m.Pooling(32, "mean")]  # noqa: E731
MEAN_NORMALIZED = lambda m: [m.Pooling(32, "mean"), m.Normalize()]  # noqa: E731
CLS = lambda m: [m.Pooling(32, "cls")]  # noqa: E731
CLS_NORMALIZED = lambda m: [m.Pooling(32, "cls"), m.Normalize()]  # noqa: E731
FAMILIES = {
    "xlm-r, mean (paraphrase-multilingual-mpnet-base-v2)": ("xlmr", MEAN),
    "xlm-r, mean, normalised (multilingual-e5)": ("xlmr", MEAN_NORMALIZED),
    "mpnet, mean, normalised (all-mpnet-base-v2)": ("mpnet", MEAN_NORMALIZED),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_gives_sentence_transformers_vectors_and_its_card(tmp_path, request, family):
    base, stack = FAMILIES[family]
    folder = tiny_models.sentence_transformers_folder(tmp_path / "st", request.getfixturevalue(base), WINDOW, stack)
    reference = _reference(folder)
    ours = Embedder(folder, "cpu", "fp32", None)
    _assert_same_vectors(ours, reference)
    _assert_card_is_the_loaded_models(folder, ours, reference)
    assert "token_type_ids" not in ours.prepare_ids(ours.encode(TEXTS[:1]))  # neither family takes them


def test_xlm_r_windows_are_the_tokenizers_own_ids_wrapped_in_s_and_end_tokens(xlmr):
    """``special_layout`` finds <s> in front and </s> behind (ids 0 and 2), and with a prompt the
    prompt's pieces after <s>; the ids docembed builds equal the tokenizer's for the whole text."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(xlmr)
    for prefix in ("", "passage: ", "query: "):
        ours = Embedder(xlmr, "cpu", "fp32", None, WINDOW, prefix)
        head, tail = special_layout(ours.tokenizer, prefix)
        assert head[0] == hf.bos_token_id == 0 and tail == [hf.eos_token_id] == [2]
        assert head[1:] == hf(prefix, add_special_tokens=False).input_ids
        built = ours.prepare_ids([ids[:ours.window_size] for ids in ours.encode(TEXTS)])
        for row, text in enumerate(TEXTS):
            expected = hf(prefix + text, truncation=True, max_length=WINDOW).input_ids
            mask = built["attention_mask"][row].numpy().astype(bool)
            assert built["input_ids"][row].numpy()[mask].tolist() == expected, (prefix, text)
            assert (built["input_ids"][row].numpy()[~mask] == hf.pad_token_id).all()  # <pad> is 1, not 0


# Prompted families: (base, stack, the model's own prompts, the prompt a run names, --truncate-dim).
PROMPTED = {
    # multilingual-e5: "passage: " for documents, "query: " for queries.
    "multilingual-e5 passage": ("xlmr", MEAN_NORMALIZED, {"query": "query: ", "passage": "passage: "}, "passage",
                                None),
    # bge-*-en-v1.5: CLS pooling, a query instruction of 8 tokens that the window of 32 must make room for.
    "bge query instruction": ("bert", CLS_NORMALIZED, {"query": BGE_QUERY, "document": ""}, "query", None),
    "bge document, empty prompt": ("bert", CLS_NORMALIZED, {"query": BGE_QUERY, "document": ""}, "document", None),
    # mxbai-embed-large-v1: CLS pooling and no Normalize module, Matryoshka: truncated, not re-normalised.
    "mxbai matryoshka, not normalised": ("bert", CLS, {"query": BGE_QUERY}, "query", 8),
}


@pytest.mark.parametrize("family", PROMPTED)
def test_a_named_prompt_and_truncation_give_sentence_transformers_vectors(tmp_path, request, family):
    """docembed's ``--prompt-name`` path: the run's prefix is ``prompt_text`` of the model's prompts,
    and the Embedder puts it before each text; sentence-transformers' ``prompt_name`` must give the
    same vectors, also where the prompt shortens the room left for the text."""
    base, stack, prompts, name, truncate_dim = PROMPTED[family]
    window = WINDOW if base == "xlmr" else 32  # BERT: the long text and the instruction overflow 32 tokens
    folder = tiny_models.sentence_transformers_folder(tmp_path / "st", request.getfixturevalue(base), window, stack,
                                                      prompts)
    prefix = prompt_text(folder, name)
    assert prefix == prompts[name]
    reference = _reference(folder, truncate_dim=truncate_dim)
    ours = Embedder(folder, "cpu", "fp32", None, prefix=prefix, truncate_dim=truncate_dim)
    got = _assert_same_vectors(ours, reference, prompt_name=name)
    _assert_card_is_the_loaded_models(folder, ours, reference, prefix, truncate_dim)
    if prefix:  # the prompt changes the vectors, so a prefix left out would be seen above
        unprompted = Embedder(folder, "cpu", "fp32", None, truncate_dim=truncate_dim).embed(TEXTS)
        assert _cosines(got, unprompted).min() < 0.9999
    if truncate_dim:  # a model without Normalize keeps its norms when truncated
        assert got.shape[1] == truncate_dim and not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A nomic-embed-text-like folder: an architecture of its own in the folder's Python files, mean
    pooling, Normalize, Matryoshka, and nomic's task prompts."""
    root = tmp_path_factory.mktemp("docembed-remote-code")
    base = tiny_models.remote_code(root / "encoder", WINDOW)
    prompts = {"search_query": "search_query: ", "search_document": "search_document: "}
    return tiny_models.sentence_transformers_folder(root / "st", base, WINDOW, MEAN_NORMALIZED, prompts,
                                                    trust_remote_code=True)


def test_a_model_with_its_own_architecture_needs_trust_remote_code_and_then_matches(remote):
    """Without ``trust_remote_code`` the worker refuses to load the model (naming the option); with it,
    the vectors are sentence-transformers' own, loaded with ``trust_remote_code=True``."""
    with pytest.raises(ModelError, match="(?s)cannot load model from .*trust_remote_code=True"):
        Embedder(remote, "cpu", "fp32", None)
    prefix = prompt_text(remote, "search_document")
    ours = Embedder(remote, "cpu", "fp32", None, prefix=prefix, truncate_dim=16, trust_remote_code=True)
    assert type(ours.model).__name__ == "TinyEncoderModel"
    reference = _reference(remote, truncate_dim=16, trust_remote_code=True)
    got = _assert_same_vectors(ours, reference, prompt_name="search_document")
    assert got.shape[1] == 16 and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    _assert_card_is_the_loaded_models(remote, ours, reference, prefix, 16)


@pytest.mark.parametrize("family", ["bert", "xlmr", "mpnet", "remote"])
def test_int8_takes_encoders_with_berts_layer_names_and_refuses_others(request, family):
    """``--precision int8`` keeps ``encoder.layer.0.output.dense`` in fp32: XLM-R and MPNet name their
    layers as BERT does and are quantized (their int8 quality is unmeasured: the floors were measured
    on all-MiniLM-L6-v2); an architecture without that layer is refused, not quantized blindly."""
    import torch

    from docembed.model.quantize import KEEP_FP32, quantize_int8

    folder = request.getfixturevalue(family)
    ours = Embedder(folder, "cpu", "fp32", None, WINDOW, trust_remote_code=True)
    linears = [name for name, m in ours.model.named_modules() if type(m) is torch.nn.Linear]
    if family == "remote":
        with pytest.raises(ModelError, match="validated for BERT-style encoders only"):
            quantize_int8(ours.model)
    else:
        assert quantize_int8(ours.model) == sorted(set(linears) - {KEEP_FP32}) and KEEP_FP32 in linears
        assert np.isfinite(ours.embed(TEXTS)).all()
