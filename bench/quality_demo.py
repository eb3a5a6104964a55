"""The examples of docs/QUALITY.md: docembed run on the bundled corpus, then after deliberate changes.

    python bench/quality_demo.py --out bench/results/quality-demo.txt

- drift, HTML: three nightly runs into one output. Day 1 embeds rows 0, 3, 6, ... of
  jobs/sample/docs.parquet, day 2 rows 1, 4, 7, ..., day 3 rows 2, 5, 8, ... replaced by their HTML
  rendering (pydoc's, the standard library's own documentation renderer);
- drift, first line: the same, but day 3's texts are cut to their first line;
- canaries: on the HTML scenario's output, ``verify`` re-embeds the canaries at another precision (bf16,
  int8); a resume asking for int8 (refused by the output's numerics label, before any work); a resume
  whose workers compute at the same labels but with weights perturbed by 2% (the tests' hook,
  ``DOCEMBED_FAULT=loaded@*:perturb=0.02``, standing for another build), refused by the canaries.

Every command runs as a user would run it (``python -m docembed ...`` in a subprocess, --fail-on-drift
on); the lines a reader needs are printed with the command and its exit code.
"""

from __future__ import annotations

import argparse
import os
import pydoc
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "jobs" / "sample" / "docs.parquet"
SHOWN = ("  input", "  vectors", "  canaries", "  drift", "verify", "  canaries:", "  - ", "docembed: error")


def html(text: str) -> str:
    doc = pydoc.HTMLDoc()
    return doc.page("doc", doc.markup(text, doc.preformat))


def first_line(text: str) -> str:
    return text.strip().splitlines()[0]


def write_day(path: Path, rows: range, change=None) -> None:
    table = pq.read_table(SAMPLE)
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    pq.write_table(pa.table({"id": [ids[i] for i in rows],
                             "text": [(change or (lambda t: t))(texts[i]) for i in rows]}), path)


def docembed(args: list[str], log, env: dict | None = None) -> int:
    shown = " ".join(a if not a.startswith("/") else Path(a).name for a in args)
    prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    done = subprocess.run([sys.executable, "-m", "docembed", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    log(f"$ {prefix + ' ' if prefix else ''}docembed {shown}   # exit {done.returncode}")
    for line in (done.stdout + done.stderr).splitlines():
        if line.startswith(SHOWN):
            log(line)
    log("")
    return done.returncode


def drift_scenario(tmp: Path, name: str, change, log) -> Path:
    inputs, output = tmp / name / "in", tmp / name / "out"
    inputs.mkdir(parents=True)
    log(f"## drift: day 3 {name}\n")
    for day, rows, day_change in ((1, range(0, 400, 3), None), (2, range(1, 400, 3), None),
                                  (3, range(2, 400, 3), change)):
        write_day(inputs / f"day{day}.parquet", rows, day_change)
        docembed(["run", "--input", str(inputs), "--output", str(output), "--no-progress", "--fail-on-drift"], log)
    return output


def canary_scenario(tmp: Path, output: Path, log) -> None:
    log("## canaries\n")
    for precision in ("bf16", "int8"):
        docembed(["verify", "--output", str(output), "--precision", precision], log)
    inputs = output.parent / "in"
    write_day(inputs / "day4.parquet", range(0, 400, 7), lambda t: t + " (revised)")
    table = pq.read_table(inputs / "day4.parquet")
    pq.write_table(table.set_column(0, "id", pa.array([f"day4-{i}" for i in table.column("id").to_pylist()])),
                   inputs / "day4.parquet")
    base = ["run", "--input", str(inputs), "--output", str(output), "--no-progress"]
    docembed([*base, "--precision", "int8"], log)
    docembed(base, log, {"DOCEMBED_FAULT": "loaded@*:perturb=0.02"})
    docembed(base, log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="also write the log here")
    parser.add_argument("--keep", default=None, help="make the outputs in this folder and keep them")
    args = parser.parse_args()
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with open("/proc/cpuinfo") as handle:
        model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "?")
    log(f"# {model}, {os.cpu_count()} cores\n")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(args.keep or folder)
        html_output = drift_scenario(tmp, "HTML", html, log)
        drift_scenario(tmp, "first-line", first_line, log)
        canary_scenario(tmp, html_output, log)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
