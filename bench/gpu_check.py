"""GPU check: correctness against a CPU fp32 reference, and throughput of docembed's model loop on CUDA.

Runs docembed's own inference path (``docembed.transforms.inference.embed_rows``: token-length sorting,
token-budget batches, tokenization overlapped with the model, pinned memory, non-blocking copies), not
Beam, so it needs no packages beyond the GPU image's (torch, transformers, sentence-transformers,
pyarrow). Assets come from bench/prepare_gpu_assets.py.

    python bench/gpu_check.py --assets bench/gpu_assets --out $OUT/gpu_check.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docembed.transforms.inference import embed_rows  # noqa: E402
from docembed.model.embedder import Embedder  # noqa: E402
from docembed.model.ref import ModelRef  # noqa: E402
from docembed.records import EmbedSettings  # noqa: E402


def settings_for(batch: int, window: int) -> EmbedSettings:
    return EmbedSettings(
        output="", model_ref=ModelRef("", "local", ""), dim=0, max_seq_length=window, pooling="",
        normalize=True, precision="", device="", prefix="", id_column="id", text_column="text",
        passthrough_columns=(), min_batch_size=batch, max_batch_size=batch, max_batch_tokens=batch * window,
        run_id="gpu-check",
    )


def matmul_peak(torch, device: str, dtype) -> float:
    n = 8192 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(torch, device)
    runs, start = 10, time.perf_counter()
    for _ in range(runs):
        a @ b
    _sync(torch, device)
    return runs * 2 * n**3 / (time.perf_counter() - start)


def _sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def model_flops(config, shapes) -> float:
    layers, d, ffn = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    return sum(layers * (2 * n * length * (4 * d * d + 2 * d * ffn) + 4 * n * length * length * d)
               for n, length in shapes)


def bert_base(tmp: Path, tokenizer_dir: str) -> str:
    """A BERT-base-sized sentence-transformers model with random weights (none is packaged)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(tmp / "bert")  # bert-base: 12 layers, 768 wide, 512 positions
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp / "bert")
    SentenceTransformer(modules=[Transformer(str(tmp / "bert"), max_seq_length=512), Pooling(768, "mean")]).save(
        str(tmp / "bert-st"))
    return str(tmp / "bert-st")


def throughput(name, path, texts, device, precision, window, batches, peak) -> list[dict]:
    embedder = Embedder(path, device, precision, None, window)
    rows = []
    for batch in batches:
        settings = settings_for(batch, embedder.max_seq_length)
        embed_rows(embedder, texts[:batch * 4], settings)  # warm-up: kernels, allocator
        import torch

        _sync(torch, device)
        start = time.perf_counter()
        out = embed_rows(embedder, texts, settings)
        seconds = time.perf_counter() - start
        shapes = []
        for docs, _, padded, _ in out.batch_stats:
            shapes.append((docs, padded // docs))
        flops = model_flops(embedder.model.config, shapes)
        rows.append({"model": name, "precision": precision, "batch": batch, "docs": len(texts),
                     "docs_per_s": len(texts) / seconds, "tokens_per_s": out.tokens / seconds,
                     "padding_share": (out.padded_tokens - out.tokens) / out.tokens,
                     "model_flops_utilization": flops / seconds / peak, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--assets", default="bench/gpu_assets")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeat", type=int, default=10, help="corpus copies for the throughput runs")
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--limit", type=int, default=0, help="cap the documents (a quick dry run on a CPU)")
    parser.add_argument("--out", default="gpu_check.md")
    args = parser.parse_args()
    import torch

    assets = Path(args.assets)
    minilm = str(assets / "minilm")
    texts = pq.read_table(assets / "corpus.parquet").column("text").to_pylist()
    reference = np.load(assets / "reference.npy")
    if args.limit:
        reference = reference[:args.limit]
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    lines = [f"# GPU check on {device_name} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}), "
             f"torch {torch.__version__}", ""]

    for precision in ("fp16", "bf16") if args.device == "cuda" else ("fp32",):
        embedder = Embedder(minilm, args.device, precision, None)
        got = embed_rows(embedder, texts[: len(reference)], settings_for(64, 256)).vectors
        cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        verdict = "PASS" if cos.min() >= 0.999 else "FAIL"
        lines.append(f"- correctness, MiniLM {precision} vs CPU fp32 reference ({len(reference)} docs): "
                     f"mean cosine {cos.mean():.6f}, min {cos.min():.6f}: {verdict} (floor 0.999)")
        print(lines[-1], flush=True)

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    peak = matmul_peak(torch, args.device, dtype)
    lines += ["", f"Matrix-multiply peak measured here: {peak / 1e12:.1f} TFLOP/s ({dtype}).", ""]
    corpus = texts * args.repeat
    if args.limit:
        corpus, reference = corpus[:args.limit], reference[:args.limit]
    precision = "fp16" if args.device == "cuda" else "fp32"
    batches = [int(b) for b in args.batches.split(",")]
    rows = throughput("all-MiniLM-L6-v2", minilm, corpus, args.device, precision, 256, batches, peak)
    with tempfile.TemporaryDirectory() as tmp:
        rows += throughput("BERT-base (random weights)", bert_base(Path(tmp), minilm), corpus, args.device,
                           precision, 512, batches, peak)
    lines += ["| model | precision | batch | docs | docs/s | tokens/s | padding | model FLOP utilization |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['precision']} | {r['batch']} | {r['docs']} | {r['docs_per_s']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {100 * r['padding_share']:.1f}% | {r['model_flops_utilization']:.2f} |"
              for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
