"""Start-up cost: the docembed CLI embedding a 10-document corpus against the bare imports it stands on,
each command in a fresh process, wall time from Popen to reap, the repeats interleaved.

    python bench/startup.py --repeats 5 --threads 2 --out bench/results/startup.md [--baseline DIR]

Per repeat, in this order: python -c "import torch", python -c "import apache_beam",
python -c "import transformers.modeling_utils", and python -m docembed run --input C --output FRESH_DIR
--no-progress --threads T (a new output folder each time, so that it really embeds; its 10 rows are
checked). Reported: median and min-max wall per command, and docembed's median over import torch's
(the target is at most 2.5x). The raw record of every run is written next to the report (.json).
--baseline DIR adds the same docembed command run from DIR, a checkout of another commit (say the one
before a change), so that before and after are measured in one invocation.
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

import pyarrow.dataset as ds

from run import REPO, RSS_SOURCE, measure, run_meta, save_report

PY = sys.executable
DOCS = 10
TARGET = 2.5
IMPORTS = ("torch", "apache_beam", "transformers.modeling_utils")


def commands(corpus: Path, out: Path, threads: int, baseline: str | None) -> dict[str, tuple[list[str], Path | None]]:
    """(command, the output folder it must fill) of one repeat, by label; out must be new each repeat."""
    def run(folder: Path) -> list[str]:
        return [PY, "-m", "docembed", "run", "--input", str(corpus), "--output", str(folder), "--no-progress",
                "--threads", str(threads)]

    found = {**{f"import {m}": ([PY, "-c", f"import {m}"], None) for m in IMPORTS}, "docembed run": (run(out), out)}
    if baseline:  # from the other checkout's own folder, so that its packages are the ones imported
        other = out.with_name(out.name + "-baseline")
        found["docembed run, baseline checkout"] = (
            ["/bin/sh", "-c", f"cd {shlex.quote(baseline)} && exec {shlex.join(run(other))}"], other)
    return found


def check_embedded(label: str, folder: Path) -> None:
    rows = ds.dataset(str(folder), format="parquet").count_rows()
    if rows != DOCS:
        raise SystemExit(f"{label} wrote {rows} rows to {folder}, not {DOCS}")


def render(meta: dict, records: list[dict]) -> str:
    lines = ["# docembed start-up", "",
             f"- Command: `{meta['command']}`", f"- Date: {meta['date']}", f"- CPU: {meta['cpu']}",
             f"- Threads: {meta['threads']} (docembed's --threads); repeats: {meta['repeats']}, interleaved "
             f"in the order below, each command in a fresh process; wall time from Popen to reap",
             f"- Peak RSS: {RSS_SOURCE}", "",
             "| command | median s | min-max s | peak RSS MiB, median | other processes' CPU s during it, median (max) |",
             "|---|---|---|---|---|"]
    medians = {}
    for label, cmd in meta["commands"].items():
        mine = [r for r in records if r["label"] == label]
        walls = [r["wall_s"] for r in mine]
        medians[label] = statistics.median(walls)
        others = [r["others_cpu_s"] for r in mine]
        lines.append(f"| `{cmd}` | {medians[label]:.2f} | {min(walls):.2f}-{max(walls):.2f} | "
                     f"{statistics.median(r['peak_rss_mib'] for r in mine):.0f} | "
                     f"{statistics.median(others):.1f} ({max(others):.1f}) |")
    ratio = medians["docembed run"] / medians["import torch"]
    lines += ["", f"docembed run ({DOCS} documents, fresh output) / import torch, medians: "
                  f"{medians['docembed run']:.2f} s / {medians['import torch']:.2f} s = {ratio:.2f}x "
                  f"(target <= {TARGET}x: {'met' if ratio <= TARGET else 'not met'})"]
    if "docembed run, baseline checkout" in medians:
        before = medians["docembed run, baseline checkout"]
        lines.append(f"baseline checkout / import torch: {before:.2f} s / {medians['import torch']:.2f} s = "
                     f"{before / medians['import torch']:.2f}x; this checkout takes {medians['docembed run'] / before:.2f}x "
                     "the baseline's time")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/startup.md")
    parser.add_argument("--baseline", default=None, help="a checkout of another docembed commit to run as well")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="docembed-startup-"))
    corpus = work / "corpus.parquet"
    subprocess.run([PY, "bench/corpus.py", "--docs", str(DOCS), "--out", str(corpus)], cwd=REPO, check=True,
                   capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    records = []
    for repeat in range(1, args.repeats + 1):
        for label, (cmd, folder) in commands(corpus, work / f"out-{repeat}", args.threads, args.baseline).items():
            cost, _ = measure(cmd, env)
            if folder:
                check_embedded(label, folder)
            records.append({"label": label, "repeat": repeat, "command": cmd, **cost})
            print(f"repeat {repeat}/{args.repeats} {label}: {cost['wall_s']:.2f} s", file=sys.stderr)
    shutil.rmtree(work)
    shown = {label: shlex.join(["python", *cmd[1:]]) if cmd[0] == PY else cmd[-1].replace(PY, "python")
             for label, (cmd, _) in commands(Path("CORPUS"), Path("FRESH_DIR"), args.threads, args.baseline).items()}
    meta = run_meta(threads=args.threads, repeats=args.repeats, commands=shown)
    save_report(out, meta, records, render(meta, records))


if __name__ == "__main__":
    main()
