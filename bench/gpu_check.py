"""GPU check: docembed's numbers on CUDA against a CPU fp32 reference, its behaviour under GPU conditions
(two threads on one model, canaries, out-of-memory splitting, whole-document windows, GPU batch sizes),
and the throughput of its model loop. Each check prints one line, PASS, FAIL or SKIP, with its figure;
the script exits 1 if any check fails. ``bench/gpu_check.sh`` is the command a GPU machine runs.

    python bench/gpu_check.py --assets bench/gpu_assets --out $OUT/gpu_check.md          # on a GPU
    python bench/gpu_check.py --device cpu --quick --assets DIR --out /tmp/gpu_check.md   # any machine

Checks (``--only``/``--skip`` take their names):

- ``minilm``: all-MiniLM-L6-v2 at fp16 and bf16 against sentence-transformers' CPU fp32 vectors, cosine >= 0.999;
- ``pooling``: a random-weight model per pooling mode (cls, max, mean, mean_sqrt_len_tokens, weightedmean,
  lasttoken), and mean pooling that leaves the prompt out, each at fp16 and bf16 against the same model on
  the CPU in fp32 (docembed's own code), with a prompt ("query: ") and without;
- ``threads``: two threads embedding through one shared model at once, as Beam's harness threads share it
  (``--number_of_worker_harness_threads 2`` on Dataflow, or the DirectRunner's multi_threading mode);
- ``canaries``: the canary record made on CUDA checked against one pinned on the CPU (fp32), as
  ``docembed/model/canaries.py`` documents: within ``--canary-threshold`` it passes; above its lowest
  cosine it refuses with CanaryMismatch naming both numerics; at -1 it never refuses; and the numerics
  labels alone already differ (``numerics.same``), which is what refuses a GPU worker on a CPU output;
- ``oom``: a batch budget far beyond a memory cap (``torch.cuda.set_per_process_memory_fraction``) so the
  first batches run out of memory: they must be split and retried until nothing is rejected;
- ``windows``: ``--long-docs mean`` and ``chunks`` (with overlap, and sentence boundaries) on long documents,
  every window and every document's mean against the CPU fp32 computation;
- ``host_path``: the first-window path at Dataflow's GPU batch sizes (64 to 256 documents within 65,536
  padded tokens): nothing rejected, batches within the budget, vectors against the reference;
- ``pipeline``: the real job through Beam's DirectRunner with ``--direct_num_workers 2
  --direct_running_mode multi_threading`` at those batch sizes (needs apache-beam, which the GPU machine's
  image lacks: SKIP there unless its wheels are brought along; see gpu_check.sh);
- ``throughput`` (a measurement, not a check): MiniLM and a BERT-base-sized random-weight model at batch
  64, 128 and 256: docs/s, tokens/s, model FLOP utilization.

On ``--device cpu`` the GPU-only checks (``oom``) print SKIP; the others compare the CPU at
``--precisions`` (default fp32) against the CPU fp32 reference, so ``tests/test_gpu_check.py`` keeps this
script running. It needs torch, transformers, tokenizers, safetensors, numpy and pyarrow (the GPU
image's), docembed from this checkout, and the assets of ``bench/prepare_gpu_assets.py``; nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from docembed.transforms.inference import embed_rows, embed_windows  # noqa: E402
from docembed.model.embedder import Embedder  # noqa: E402
from docembed.model.ref import ModelRef  # noqa: E402
from docembed.records import EmbedSettings  # noqa: E402
from prepare_gpu_assets import POOLINGS, PROMPT_EXCLUDED, build_tiny_models  # noqa: E402

FLOOR = 0.999  # cosine to the CPU fp32 reference, the floor docs/QUALITY.md holds fp16 and bf16 to
CHECKS = ("minilm", "pooling", "threads", "canaries", "oom", "windows", "host_path", "pipeline", "throughput")


def settings_for(batch: int, window: int, max_batch: int | None = None, tokens: int | None = None,
                 **extra) -> EmbedSettings:
    return EmbedSettings(
        output="", model_ref=ModelRef("", "local", ""), dim=0, max_seq_length=window, pooling="",
        normalize=True, precision="", device="", prefix="", id_column="id", text_column="text",
        passthrough_columns=(), min_batch_size=batch, max_batch_size=max_batch or batch,
        max_batch_tokens=tokens or batch * window, run_id="gpu-check", **extra,
    )


# Dataflow's GPU job (jobs/dataflow-gpu.yaml): 64 to 256 documents within 65,536 padded tokens.
def gpu_batches(window: int) -> EmbedSettings:
    return settings_for(64, window, 256, 65536)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


class Report:
    """The check lines, printed as they come and kept for the Markdown file."""

    def __init__(self):
        self.lines: list[str] = []
        self.failed: list[str] = []

    def say(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)

    def result(self, name: str, ok: bool, figure: str) -> bool:
        self.say(f"{'PASS' if ok else 'FAIL'} {name}: {figure}")
        if not ok:
            self.failed.append(name)
        return ok

    def skip(self, name: str, why: str) -> None:
        self.say(f"SKIP {name}: {why}")

    def floor(self, name: str, cos: np.ndarray, floor: float = FLOOR, extra: str = "") -> bool:
        ok = bool(np.isfinite(cos).all() and cos.min() >= floor)
        return self.result(name, ok, f"min cosine {np.nanmin(cos):.6f}, mean {np.nanmean(cos):.6f} over {len(cos)}"
                                     f" (floor {floor}){extra}")


class Context:
    def __init__(self, args, torch):
        self.args, self.torch, self.device = args, torch, args.device
        self.assets = Path(args.assets)
        self.minilm = str(self.assets / "minilm")
        self.texts = pq.read_table(self.assets / "corpus.parquet").column("text").to_pylist()
        self.reference = np.load(self.assets / "reference.npy")
        if args.limit:
            self.reference = self.reference[:args.limit]
        self.precisions = args.precisions.split(",") if args.precisions else (
            ["fp16", "bf16"] if self.device == "cuda" else ["fp32"])
        self._cpu_minilm = None
        self.tmp = tempfile.mkdtemp(prefix="gpu-check-")

    def cpu_minilm(self) -> Embedder:
        if self._cpu_minilm is None:
            self._cpu_minilm = Embedder(self.minilm, "cpu", "fp32", None)
        return self._cpu_minilm

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def free(self):
        import gc

        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


def versions(torch) -> list[str]:
    """The card, torch, its CUDA build and the driver: what a failure report needs first."""
    if not torch.cuda.is_available():
        return [f"- device: CPU only (torch {torch.__version__}, CUDA build {torch.version.cuda}, no CUDA device)"]
    driver = "unknown (nvidia-smi not found)"
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    props = torch.cuda.get_device_properties(0)
    return [f"- card: {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, "
            f"compute capability {props.major}.{props.minor})",
            f"- torch {torch.__version__}, CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
            f"NVIDIA driver {driver}"]


# ---- checks ---------------------------------------------------------------------------------------

def check_minilm(ctx: Context, report: Report) -> None:
    texts = ctx.texts[:len(ctx.reference)]
    for precision in ctx.precisions:
        embedder = Embedder(ctx.minilm, ctx.device, precision, None)
        got = embed_rows(embedder, texts, settings_for(64, 256)).vectors
        report.floor(f"minilm {precision} vs sentence-transformers CPU fp32 ({len(texts)} docs)",
                     cosines(got, ctx.reference))
        del embedder
        ctx.free()


def check_pooling(ctx: Context, report: Report) -> None:
    # Built here, not copied (prepare_gpu_assets.py says why), unless the assets hold them already.
    tiny = ctx.assets / "tiny" if (ctx.assets / "tiny").is_dir() else Path(ctx.tmp) / "tiny"
    folders = build_tiny_models(tiny, Path(ctx.minilm))
    texts = ctx.texts[:16 if ctx.args.quick else 128]
    settings = settings_for(32, 128)
    for name in POOLINGS + (PROMPT_EXCLUDED,):
        # The prompt-excluding model only differs with a prompt; every other mode is checked without
        # one and with one (the prompt's tokens then sit in front of every text, after the specials).
        for prefix in ("query: ",) if name == PROMPT_EXCLUDED else ("", "query: "):
            label = f"pooling {name}{' with prompt' if prefix else ''}"
            cpu = Embedder(folders[name], "cpu", "fp32", None, prefix=prefix)
            reference = embed_rows(cpu, texts, settings).vectors
            for precision in ctx.precisions:
                try:
                    # On the CPU at fp32 (the unit test's run) the reference model is the one checked.
                    embedder = cpu if (ctx.device, precision) == ("cpu", "fp32") else \
                        Embedder(folders[name], ctx.device, precision, None, prefix=prefix)
                    out = embed_rows(embedder, texts, settings)
                except Exception as exc:  # noqa: BLE001 - a mode that cannot run here is this check's failure
                    report.result(f"{label} {precision}", False, _error(exc))
                    continue
                if out.failed:
                    report.result(f"{label} {precision}", False, f"{len(out.failed)} of {len(texts)} documents "
                                  f"failed: {next(iter(out.failed.values()))[:300]}")
                    continue
                report.floor(f"{label} {precision} vs CPU fp32", cosines(out.vectors, reference))


def check_threads(ctx: Context, report: Report) -> None:
    """Two threads, one model: each embeds its half of the corpus while the other does."""
    precision = ctx.precisions[0]
    embedder = Embedder(ctx.minilm, ctx.device, precision, None)
    texts = ctx.texts[:len(ctx.reference)]
    settings = gpu_batches(embedder.max_seq_length)
    embed_rows(embedder, texts[:64], settings)  # warm-up
    halves = [list(range(0, len(texts), 2)), list(range(1, len(texts), 2))]
    results, errors = [None, None], []

    def work(k):
        try:
            results[k] = embed_rows(embedder, [texts[i] for i in halves[k]], settings)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        report.result(f"threads: two threads on one {precision} model", False, _error(errors[0]))
        return
    got = np.zeros_like(ctx.reference)
    for k in (0, 1):
        got[halves[k]] = results[k].vectors
    failed = sum(len(r.failed) for r in results)
    ok = report.floor(f"threads: two threads on one {precision} model vs CPU fp32", cosines(got, ctx.reference),
                      extra=f"; {failed} rejected; {len(texts) / seconds:.0f} docs/s")
    if ok and failed:
        report.result("threads: nothing rejected", False, f"{failed} documents rejected")
    del embedder
    ctx.free()


def check_canaries(ctx: Context, report: Report) -> None:
    from docembed.errors import CanaryMismatch
    from docembed.model import canaries, numerics

    pinned = canaries.probe(ctx.cpu_minilm())
    pinned["numerics"] = numerics.resolve("cpu", "fp32")
    for precision in ctx.precisions:
        name = f"canaries {ctx.device} {precision} against a CPU fp32 pin"
        try:
            mine_numerics = numerics.resolve(ctx.device, precision)
        except Exception as exc:  # noqa: BLE001 - e.g. bf16 on a CPU without it
            report.skip(name, _error(exc))
            continue
        embedder = Embedder(ctx.minilm, ctx.device, precision, None)
        mine = canaries.probe(embedder)
        mine["numerics"] = mine_numerics
        try:
            found = canaries.check(pinned, mine, canaries.THRESHOLD)
        except CanaryMismatch as exc:
            report.result(f"{name}, threshold {canaries.THRESHOLD}", False, f"refused: {exc}"[:600])
            continue
        report.result(f"{name}, threshold {canaries.THRESHOLD}", found["checked"] == len(canaries.TEXTS)
                      and not found["failed"], f"{found['checked']} checked, lowest cosine {found['min_cosine']:.6f} "
                      f"('{found['lowest']}'), failed {found['failed']}")
        # Above the lowest cosine the worker must refuse, naming what differs between the two numerics.
        strict = min(found["min_cosine"] + 1e-6, 1.5)
        try:
            canaries.check(pinned, mine, strict)
            report.result(f"{name}, threshold {strict:.6f} refuses", False, "no CanaryMismatch was raised")
        except CanaryMismatch as exc:
            message = str(exc)
            expected = [f"device cpu -> {ctx.device}"] if ctx.device != "cpu" else []
            expected += ["refuses to commit"] + ([f"precision fp32 -> {precision}"] if precision != "fp32" else [])
            missing = [e for e in expected if e not in message]
            report.result(f"{name}, threshold {strict:.6f} refuses", not missing,
                          f"CanaryMismatch names {', '.join(expected)}" if not missing else
                          f"the message lacks {missing}: {message[:400]}")
        off = canaries.check(pinned, mine, -1)  # -1: compared and recorded, never refused
        report.result(f"{name}, threshold -1 never refuses", off.get("checked", 0) > 0,
                      f"{off.get('checked')} compared")
        labels_differ = not numerics.same(pinned["numerics"], mine_numerics)
        report.result(f"{name}: numerics labels", labels_differ == ((ctx.device, precision) != ("cpu", "fp32")),
                      f"numerics.same is {not labels_differ} (a GPU worker on a CPU output is refused by its labels "
                      "before the canaries are compared)")
        del embedder
        ctx.free()


def check_oom(ctx: Context, report: Report) -> None:
    name = "oom: a batch budget beyond a memory cap is split, nothing rejected"
    if ctx.device != "cuda":
        report.skip(name, "CUDA only (set_per_process_memory_fraction)")
        return
    torch = ctx.torch
    precision = ctx.precisions[0]
    embedder = Embedder(ctx.minilm, "cuda", precision, None)
    texts = ctx.texts[:len(ctx.reference)]
    corpus = (texts * (2048 // len(texts) + 1))[:2048]
    ooms, others = [0], []
    forward = embedder.forward_with_norms

    def counted(features):  # count the out-of-memory errors the split recovers from
        try:
            return forward(features)
        except Exception as exc:
            # cuBLAS and cuDNN report an allocation that failed under the cap as their own RuntimeError.
            if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower() or \
                    "ALLOC_FAILED" in str(exc):
                ooms[0] += 1
            else:
                others.append(_error(exc))
            raise

    embedder.forward_with_norms = counted
    ctx.free()
    total = torch.cuda.get_device_properties(0).total_memory
    # 512 MiB above what the model holds: 2,048 x 256 tokens of MiniLM's 1,536-wide FFN in fp16 alone
    # take 1.6 GB, so the first batch must fail, while ~128 documents fit.
    cap = torch.cuda.memory_allocated() + 512 * 2**20
    try:
        torch.cuda.set_per_process_memory_fraction(cap / total)
        out = embed_rows(embedder, corpus, settings_for(1, 256, 4096, 4096 * 256))
    except Exception as exc:  # noqa: BLE001 - ModelFailed and the like: the check's failure
        report.result(name, False, _error(exc))
        return
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        ctx.free()
    cos = cosines(out.vectors[:len(texts)], ctx.reference)
    ok = ooms[0] > 0 and not out.failed and bool(np.isfinite(cos).all()) and cos.min() >= FLOOR
    report.result(name, ok, f"{ooms[0]} out-of-memory errors under a {cap / 2**20:.0f} MiB cap, "
                            f"{len(out.failed)} of {len(corpus)} rejected, {out.batches} planned batches, "
                            f"min cosine {cos.min():.6f}" + ("" if ooms[0] else "; no OOM happened: raise the budget")
                  + (f"; other errors: {others[0]}" if others else ""))


def check_windows(ctx: Context, report: Report) -> None:
    from docembed.model.canaries import _LONG
    from docembed.transforms.prepare.chunk import mean_by_document

    cpu = ctx.cpu_minilm()
    lengths = cpu.count(ctx.texts)
    longest = [ctx.texts[i] for i in np.argsort(-lengths)[:4 if ctx.args.quick else 24]] + [_LONG]
    precision = ctx.precisions[0]
    embedder = Embedder(ctx.minilm, ctx.device, precision, None)
    variants = [("mean", {}), ("chunks", {"chunk_overlap": 32}),
                ("chunks", {"chunk_overlap": 16, "chunk_boundary": "sentence", "boundary_lookback": 32})]
    for mode, extra in variants:
        name = f"windows --long-docs {mode} {' '.join(f'{k}={v}' for k, v in extra.items())}".rstrip()
        settings = gpu_batches(embedder.max_seq_length)
        settings = dataclasses.replace(settings, long_docs=mode, **extra)
        try:
            ref, ref_windows = embed_windows(cpu, longest, settings)
            out, windows = embed_windows(embedder, longest, settings)
        except Exception as exc:  # noqa: BLE001
            report.result(f"{name} {precision}", False, _error(exc))
            continue
        same = np.array_equal(ref_windows.token_start, windows.token_start) and \
            np.array_equal(ref_windows.token_end, windows.token_end)
        if not same or out.failed:
            report.result(f"{name} {precision}", False, f"windows equal to the CPU's: {same}; {len(out.failed)} failed")
            continue
        cos = cosines(out.vectors, ref.vectors)
        if mode == "mean":
            cos = cosines(mean_by_document(out.vectors, windows, len(longest), True),
                          mean_by_document(ref.vectors, ref_windows, len(longest), True))
        report.floor(f"{name} {precision} vs CPU fp32 ({len(windows)} windows of {len(longest)} documents)", cos)
    del embedder
    ctx.free()


def check_host_path(ctx: Context, report: Report) -> None:
    precision = ctx.precisions[0]
    embedder = Embedder(ctx.minilm, ctx.device, precision, None)
    settings = gpu_batches(embedder.max_seq_length)
    corpus = ctx.texts * (1 if ctx.args.quick else 5)
    embed_rows(embedder, corpus[:256], settings)  # warm-up
    ctx.sync()
    start = time.perf_counter()
    out = embed_rows(embedder, corpus, settings)
    seconds = time.perf_counter() - start
    biggest = max(s[0] for s in out.batch_stats)
    padded = max(s[2] for s in out.batch_stats)
    cos = cosines(out.vectors[:len(ctx.reference)], ctx.reference)
    within = biggest <= 256 and padded <= 65536 and not out.failed
    report.floor(f"host_path {precision}, --max-batch-size 256 --max-batch-tokens 65536", cos,
                 extra=f"; {len(corpus)} docs at {len(corpus) / seconds:.0f} docs/s, "
                       f"{out.tokens / seconds:.0f} tokens/s, "
                       f"largest batch {biggest} docs / {padded} padded tokens, {len(out.failed)} rejected, "
                       f"{out.forward_s / seconds:.0%} of the time in the model")
    if not within:
        report.result("host_path: batches within the budget, nothing rejected", False,
                      f"largest batch {biggest} docs, {padded} padded tokens, {len(out.failed)} rejected")
    del embedder
    ctx.free()


def check_pipeline(ctx: Context, report: Report) -> None:
    name = "pipeline: DirectRunner, 2 workers, multi_threading, GPU batch sizes"
    try:
        import apache_beam  # noqa: F401
    except ImportError:
        report.skip(name, "apache-beam is not installed here (the GPU machine's image lacks it; "
                          "bring its wheels as gpu_check.sh says to run this check)")
        return
    from docembed.pipeline.run import run

    texts = ctx.texts[:len(ctx.reference)]
    precision = ctx.precisions[0]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "docs.parquet"
        pq.write_table(pa.table({"id": [f"d{i:05d}" for i in range(len(texts))], "text": texts}), source,
                       row_group_size=64)
        argv = ["--input", str(source), "--output", str(Path(tmp) / "out"), "--model", ctx.minilm,
                "--device", ctx.device, "--precision", precision, "--min-batch-size", "64",
                "--max-batch-size", "256", "--max-batch-tokens", "65536", "--checkpoint-every", "128",
                "--no-progress", "--runner", "DirectRunner", "--direct_num_workers", "2",
                "--direct_running_mode", "multi_threading"]
        try:
            summary = run(argv)
        except Exception as exc:  # noqa: BLE001
            report.result(name, False, _error(exc))
            return
        import pyarrow.dataset as ds

        table = ds.dataset(str(Path(tmp) / "out"), format="parquet").to_table(columns=["id", "embedding"])
        dim = table.schema.field("embedding").type.list_size
        got = dict(zip(table.column("id").to_pylist(),
                       table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)))
    vectors = np.stack([got.get(f"d{i:05d}", np.zeros(dim, np.float32)) for i in range(len(texts))])
    complete = summary.get("embedded") == len(texts) and not summary.get("rejected")
    ok = report.floor(f"{name}, {precision}", cosines(vectors, ctx.reference),
                      extra=f"; embedded {summary.get('embedded')}, rejected {summary.get('rejected')}")
    if ok and not complete:
        report.result(f"{name}: every document embedded once", False, json.dumps(summary)[:400])


# ---- throughput -----------------------------------------------------------------------------------

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
    """A BERT-base-sized model with random weights (none is packaged), as a sentence-transformers folder
    written without importing that library."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp / "bert"
    BertModel(BertConfig()).save_pretrained(folder)  # bert-base: 12 layers, 768 wide, 512 positions
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 768,
                                                                  "pooling_mode": "mean"}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    return str(folder)


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
        shapes = [(docs, padded // docs) for docs, _, padded, _ in out.batch_stats]
        flops = model_flops(embedder.model.config, shapes)
        rows.append({"model": name, "precision": precision, "batch": batch, "docs": len(texts),
                     "docs_per_s": len(texts) / seconds, "tokens_per_s": out.tokens / seconds,
                     "padding_share": (out.padded_tokens - out.tokens) / out.tokens,
                     "model_flops_utilization": flops / seconds / peak, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_throughput(ctx: Context, report: Report) -> None:
    torch, device = ctx.torch, ctx.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    peak = matmul_peak(torch, device, dtype)
    report.say("")
    report.say(f"Matrix-multiply peak measured here: {peak / 1e12:.1f} TFLOP/s ({dtype}).")
    report.say("")
    corpus = ctx.texts * ctx.args.repeat
    if ctx.args.limit:
        corpus = corpus[:ctx.args.limit]
    precision = "fp16" if device == "cuda" else "fp32"
    batches = [int(b) for b in ctx.args.batches.split(",")]
    rows = throughput("all-MiniLM-L6-v2", ctx.minilm, corpus, device, precision, 256, batches, peak)
    ctx.free()
    with tempfile.TemporaryDirectory() as tmp:
        rows += throughput("BERT-base (random weights)", bert_base(Path(tmp), ctx.minilm), corpus, device,
                           precision, 512, batches, peak)
    ctx.free()
    report.say("| model | precision | batch | docs | docs/s | tokens/s | padding | model FLOP utilization |")
    report.say("|---|---|---|---|---|---|---|---|")
    for r in rows:
        report.say(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['docs']} | {r['docs_per_s']:.0f} | "
                   f"{r['tokens_per_s']:.0f} | {100 * r['padding_share']:.1f}% | {r['model_flops_utilization']:.2f} |")


def _error(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {str(exc)[:400]}{at}"


RUNNERS = {"minilm": check_minilm, "pooling": check_pooling, "threads": check_threads, "canaries": check_canaries,
           "oom": check_oom, "windows": check_windows, "host_path": check_host_path, "pipeline": check_pipeline,
           "throughput": run_throughput}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", default="bench/gpu_assets")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--precisions", default="", help="comma-separated; default fp16,bf16 on cuda, fp32 on cpu")
    parser.add_argument("--only", default="", help=f"comma-separated checks to run, of {', '.join(CHECKS)}")
    parser.add_argument("--skip", default="", help="comma-separated checks to leave out")
    parser.add_argument("--quick", action="store_true", help="fewer documents everywhere (the CPU unit test)")
    parser.add_argument("--repeat", type=int, default=10, help="corpus copies for the throughput runs")
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--limit", type=int, default=0, help="cap the reference and throughput documents")
    parser.add_argument("--out", default="gpu_check.md")
    args = parser.parse_args(argv)
    import torch

    report = Report()
    if args.device == "cuda" and not torch.cuda.is_available():
        report.result("CUDA device", False, f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees none")
        return 1
    ctx = Context(args, torch)
    report.say(f"# GPU check on {torch.cuda.get_device_name(0) if args.device == 'cuda' else 'CPU'} "
               f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    report.say("")
    for line in versions(torch):
        report.say(line)
    report.say(f"- checks on {args.device} at {', '.join(ctx.precisions)}, floor cosine {FLOOR}")
    report.say("")
    chosen = [c for c in (args.only.split(",") if args.only else CHECKS) if c not in args.skip.split(",")]
    unknown = [c for c in chosen if c not in RUNNERS]
    if unknown:
        parser.error(f"unknown checks {unknown} (known: {', '.join(CHECKS)})")
    for name in chosen:
        started = time.perf_counter()
        try:
            RUNNERS[name](ctx, report)
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            report.result(name, False, _error(exc))
            traceback.print_exc()
        print(f"   ({name}: {time.perf_counter() - started:.1f} s)", flush=True)
    report.say("")
    report.say(f"{len(report.failed)} check(s) failed" + (f": {'; '.join(report.failed)}" if report.failed else ""))
    Path(args.out).write_text("\n".join(report.lines) + "\n")
    import shutil

    shutil.rmtree(ctx.tmp, ignore_errors=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
