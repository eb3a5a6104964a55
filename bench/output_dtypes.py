"""Output dtypes: what each --output-dtype keeps of retrieval, and what it stores, against float32.

    python bench/output_dtypes.py [--docs 2000] [--queries 200] [--threads 2] [--out bench/results/output-dtypes.md]

One docembed run (fp32, float32 output, units of half the corpus) embeds the corpus; its vectors are then
stored in each dtype with the same code a commit uses (``docembed.vectors``), calibrated, as an output
is, on the first unit. The second unit is held out of the calibration: from it, ``--queries`` documents
are the queries and the rest the corpus searched. Top-10 overlap: the share of float32's ten nearest
documents (cosine) that the dtype's own search finds: by the dot product of the stored values (Hamming
distance for the binary forms), and for int8 and uint8 also after decoding each value to its bucket's
centre with the manifest's ranges (``docembed.vectors.dequantize``), as a reader that has them can. Size: the Parquet bytes of the embedding column alone (zstd, as pyarrow writes).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from docembed.vectors import CALIBRATED, OUTPUT_DTYPES, calibration, column, dequantize, quantize  # noqa: E402


def embed(docs: int, threads: int, work: Path) -> tuple[list[str], np.ndarray]:
    corpus, out = work / "corpus.parquet", work / "out"
    subprocess.run([sys.executable, "bench/corpus.py", "--docs", str(docs), "--out", str(corpus)], cwd=REPO,
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "docembed", "run", "--input", str(corpus), "--output", str(out),
                    "--checkpoint-every", str(docs // 2), "--threads", str(threads), "--device", "cpu",
                    "--precision", "fp32", "--no-progress"], cwd=REPO, check=True, capture_output=True)
    order = pq.read_table(corpus, columns=["id"]).column("id").to_pylist()
    table = ds.dataset(str(out), format="parquet").to_table()
    found = dict(zip(table.column("id").to_pylist(), np.asarray(table.column("embedding").to_pylist(), np.float32)))
    return order, np.stack([found[i] for i in order])


def top10(queries: np.ndarray, corpus: np.ndarray, dtype: str) -> np.ndarray:
    if dtype.endswith("binary"):
        q, c = queries.view(np.uint8), corpus.view(np.uint8)
        scores = -np.bitwise_count(q[:, None, :] ^ c[None, :, :]).sum(-1, dtype=np.int32)  # minus Hamming distance
    else:
        scores = queries.astype(np.float32) @ corpus.astype(np.float32).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def _overlap(truth: np.ndarray, found: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)]))


def column_bytes(vectors: np.ndarray, dtype: str, ranges: np.ndarray) -> int:
    sink = io.BytesIO()
    pq.write_table(pa.table({"embedding": column(vectors, dtype, vectors.shape[1], ranges)}), sink, compression="zstd")
    return len(sink.getvalue())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/output-dtypes.md")
    args = parser.parse_args()
    _, vectors = embed(args.docs, args.threads, Path(tempfile.mkdtemp(prefix="docembed-dtypes-")))
    half = len(vectors) // 2
    ranges = calibration(vectors[:half])  # the first unit's, as an output pins it
    held = vectors[half:]
    queries, corpus = held[:args.queries], held[args.queries:]
    truth = top10(queries, corpus, "float32")
    rows = []
    for dtype in OUTPUT_DTYPES:
        stored_q, stored_c = quantize(queries, dtype, ranges), quantize(corpus, dtype, ranges)
        overlap = _overlap(truth, top10(stored_q, stored_c, dtype))
        decoded = (_overlap(truth, top10(dequantize(stored_q, dtype, ranges), dequantize(stored_c, dtype, ranges),
                                         "float32")) if dtype in CALIBRATED else overlap)
        rows.append({"dtype": dtype, "top10_overlap": float(overlap), "top10_overlap_decoded": float(decoded),
                     "column_bytes": column_bytes(vectors, dtype, ranges),
                     "bytes_per_vector_raw": int(quantize(vectors[:1], dtype, ranges).nbytes)})
    base = rows[0]["column_bytes"]
    lines = [f"Output dtypes, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.docs} documents embedded "
             f"once (all-MiniLM-L6-v2, fp32, 384 dimensions); calibration on the first {half}; "
             f"{args.queries} held-out queries against the other {len(corpus)} held-out documents.",
             f"Command: `python bench/output_dtypes.py --docs {args.docs} --queries {args.queries} --threads {args.threads}`",
             "", "| --output-dtype | top-10 overlap with float32: stored values | decoded with the manifest's ranges | "
             "bytes per vector | embedding column, Parquet bytes | vs float32 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['top10_overlap']:.3f} | {r['top10_overlap_decoded']:.3f} | "
                     f"{r['bytes_per_vector_raw']} | {r['column_bytes']:,} | "
                     f"{base / r['column_bytes']:.1f}x smaller |")
    report = "\n".join(lines) + "\n"
    (REPO / args.out).write_text(report)
    (REPO / args.out).with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(report)


if __name__ == "__main__":
    main()
