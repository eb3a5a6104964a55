"""Peak RSS of a docembed run against corpus size: the input streams per work unit, so the peak
should not grow with the number of documents.

    python bench/memory.py --docs 2000,20000 [--extra-args "--checkpoint-every 2000"] [--out FILE.md]

The corpus is bench/corpus.py's 2,000 documents, repeated (with distinct ids) to the sizes asked. The
table is printed and, with --out, written there with the raw records beside it (FILE.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from run import measure  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", default="2000,20000")
    parser.add_argument("--extra-args", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="docembed-memory-"))
    base = work / "base.parquet"
    subprocess.run([sys.executable, "bench/corpus.py", "--docs", "2000", "--out", str(base)], cwd=REPO,
                   check=True, capture_output=True)
    source = pq.read_table(base)
    lines = [f"peak RSS of `docembed run` by corpus size ({time.strftime('%Y-%m-%d')}, extra args: "
             f"{args.extra_args or 'none'}); command: `python bench/memory.py --docs {args.docs}"
             + (f" --extra-args \"{args.extra_args}\"" if args.extra_args else "") + "`",
             "", "| documents | wall s | docs/s | peak RSS MiB |", "|---|---|---|---|"]
    records = []
    print("\n".join(lines), flush=True)
    for count in (int(n) for n in args.docs.split(",")):
        copies = -(-count // source.num_rows)
        table = pa.concat_tables([
            source.set_column(0, "id", pa.array([f"{i}#{k}" for i in source.column("id").to_pylist()]))
            for k in range(copies)]).slice(0, count)
        corpus = work / f"corpus-{count}.parquet"
        pq.write_table(table, corpus, row_group_size=1000)
        cmd = [sys.executable, "-m", "docembed", "run", "--input", str(corpus), "--output",
               str(work / f"out-{count}"), "--no-progress", *shlex.split(args.extra_args)]
        cost, _ = measure(cmd, {**os.environ, "PYTHONPATH": str(REPO)})
        records.append({"docs": count, "command": cmd, **cost})
        lines.append(f"| {count} | {cost['wall_s']:.0f} | {count / cost['wall_s']:.1f} | {cost['peak_rss_mib']:.0f} |")
        print(lines[-1], flush=True)
    if args.out:
        Path(REPO / args.out).write_text("\n".join(lines) + "\n")
        Path(REPO / args.out).with_suffix(".json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
