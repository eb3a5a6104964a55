"""The model without the launcher's disk: what the launcher reads of a model without its weights (and
that each worker's loaded model matches it), hub ids pinned to a commit and found in a hub cache, and
object-store folders copied to a worker's cache and checked against their content hash."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest

from docembed.pipeline.pin import pin_model
from tests.conftest import REPO, by_id, cosine, read_output, write_docs
from docembed.errors import ModelError, UsageError
from docembed.model.card import describe_model
from docembed.model.embedder import Embedder
from docembed.model.ref import DEFAULT_MODEL, ModelRef, content_hash, materialize, packaged_default


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory, reference_model):
    """A tiny BERT with pooling, a Dense layer (32 -> 16) and Normalize: the dimension comes from the
    last module that has one, and the pooling description names the Dense layer."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("dense-model")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=reference_model.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)).save_pretrained(
        path / "bert")
    reference_model.tokenizer.save_pretrained(path / "bert")
    modules = [Transformer(str(path / "bert"), max_seq_length=100), Pooling(32, "cls"), Dense(32, 16), Normalize()]
    SentenceTransformer(modules=modules).save(str(path / "st"))
    return str(path / "st")


@pytest.mark.parametrize("which", ["packaged", "tiny", "dense"])
@pytest.mark.parametrize("window,prefix", [(None, ""), (64, "passage: ")])
@pytest.mark.unit
def test_the_description_from_configuration_files_equals_the_loaded_model(which, window, prefix, tiny_window_model,
                                                                           dense_model):
    folder = {"packaged": packaged_default(), "tiny": tiny_window_model, "dense": dense_model}[which]
    card = describe_model(folder, window, prefix)
    loaded = Embedder(folder, "cpu", "fp32", None, window, prefix).card()
    assert card == loaded
    if which == "dense":
        assert card.dim == 16 and card.has_normalize and "Dense" in card.pooling


def _fake_hub_cache(root: Path, repo: str, commit: str) -> None:
    """A hub cache holding one snapshot of ``repo`` at ``commit`` (the layout huggingface_hub writes)."""
    cache = root / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(packaged_default(), cache / "snapshots" / commit)
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)


@pytest.mark.e2e
def test_a_hub_id_is_pinned_to_a_commit_and_found_in_the_workers_hub_cache(tmp_path, docs, reference_model):
    """What a worker image with the model baked into its hub cache gives: no network, the commit the
    launcher pinned. The run goes through the CLI with this hub cache as HF_HOME."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "hf", "acme/minilm", commit)
    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:12], texts[:12])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "docembed", "run", "--input", str(tmp_path / "in.parquet"), "--no-progress"]
    done = subprocess.run([*base, "--output", str(tmp_path / "out"), "--model", "acme/minilm"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["model"] == {"name": "acme/minilm", "revision": commit, "dim": 384, "source": "hub", "location": ""}
    got = by_id(read_output(tmp_path / "out"))
    assert cosine(np.stack([got[i] for i in ids[:12]]), reference_model.encode(texts[:12])).min() >= 0.9999
    missing = subprocess.run([*base, "--output", str(tmp_path / "out2"), "--model", "acme/minilm",
                              "--model-revision", "f" * 40], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2
    assert "model 'acme/minilm' at revision ffff" in missing.stderr and "hub cache" in missing.stderr


@pytest.mark.unit
def test_an_object_store_folder_is_copied_once_and_checked_against_the_pinned_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCEMBED_MODEL_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.put(str(packaged_default()), "/models/minilm", recursive=True)
    ref, folder = pin_model("memory://models/minilm/", None, local_runner=False)
    assert (ref.kind, ref.revision) == ("store", "sha256:" + content_hash(packaged_default()))
    assert materialize(ref) == folder  # the same cache entry: copied once per machine
    assert len(list((tmp_path / "cache").iterdir())) == 1
    fs.pipe("/models/minilm/1_Pooling/config.json", b'{"word_embedding_dimension": 384, "pooling_mode_cls_token": true}')
    with pytest.raises(ModelError, match=r"hash to sha256:\w+, but the launcher pinned " + ref.revision):
        materialize(ref)  # the folder changed after the launcher pinned it: the worker refuses it
    with pytest.raises(UsageError, match="--model-revision pins hub models"):
        pin_model("memory://models/minilm/", "main", local_runner=False)


@pytest.mark.unit
def test_the_packaged_default_is_pinned_by_content_and_a_worker_with_other_files_refuses_it(tmp_path):
    ref, folder = pin_model(DEFAULT_MODEL, None, local_runner=False)
    assert ref == ModelRef(DEFAULT_MODEL, "package", "sha256:" + content_hash(folder))
    assert materialize(ref) == folder
    with pytest.raises(ModelError, match="the launcher pinned sha256:0000"):
        materialize(ModelRef(DEFAULT_MODEL, "package", "sha256:0000000000000000"))
