"""The launcher's cost as the corpus grows: time and peak memory to plan and submit, and the graph's size.

Generates ``--files`` Parquet files holding ``--rows`` rows in all (row groups of ``--row-group``
rows, short texts), then runs, in a fresh process, everything ``docembed run`` does on the launcher
before the job runs: parse the options, read every footer and plan the units, pin and describe the
model, read the output's markers, write the plan shards, write the manifest and build and serialise
the Beam graph as a submission would. It prints the wall time, the process's peak RSS, the plan's
size, and the serialised graph's size. ``--units`` instead builds the graph for that many synthetic
units (no input files), to size the job request of a very large plan.

    python bench/launcher.py --rows 10000000 --files 100          # docs/DEPLOY.md's figures
    python bench/launcher.py --units 100000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def generate(folder: Path, rows: int, files: int, row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    per_file = rows // files
    numbers = pa.array(range(per_file), pa.int64())
    text = pc.binary_join_element_wise(pa.array(["document"] * per_file), pc.cast(numbers, pa.string()), " ")
    for k in range(files):
        ids = pc.binary_join_element_wise(pa.array([f"f{k}"] * per_file), pc.cast(numbers, pa.string()), "-")
        pq.write_table(pa.table({"id": ids, "text": text}), folder / f"part-{k:05d}.parquet", row_group_size=row_group)


def launch(argv: list[str]) -> dict:
    """In this process: the launcher's work for ``argv`` up to submitting the job."""
    import apache_beam as beam
    from apache_beam.runners.direct.direct_runner import DirectRunner

    from docembed.pipeline.admin import manifest
    from docembed.pipeline.graph import JobPlan, build_graph
    from docembed.pipeline.plan import split_done
    from docembed.pipeline.run import prepare

    started = time.perf_counter()
    options, opts, output, plan, settings = prepare(argv)
    markers = output.done_markers()
    todo, _, _ = split_done(plan, markers)
    output.clean_leftovers(markers)
    output.write_manifest(manifest.started(settings, plan, opts.checkpoint_every))
    shards = output.write_plan(settings.run_id, todo)
    pipeline = beam.Pipeline(runner=DirectRunner(), options=options)
    build_graph(pipeline, JobPlan(shards, [], ([], [])), settings)
    graph = len(pipeline.to_runner_api().SerializeToString())
    return {"rows": plan.rows, "files": len(plan.files), "units": len(todo), "shards": len(shards),
            "seconds": time.perf_counter() - started, "graph_bytes": graph}


def synthetic(units: int, output: str) -> dict:
    """The graph for ``units`` synthetic units, and the graph ``beam.Create(units)`` would have made."""
    import dataclasses

    import apache_beam as beam
    from apache_beam.runners.direct.direct_runner import DirectRunner

    from docembed.pipeline.graph import JobPlan, build_graph
    from docembed.store.admin import OutputAdmin
    from docembed.pipeline.run import prepare
    from docembed.records import WorkUnit

    _, _, _, _, settings = prepare(["--input", str(REPO / "jobs" / "sample" / "docs.parquet"), "--output", output])
    settings = dataclasses.replace(settings, output=output)
    # 100 units per file, each file with an etag-like fingerprint (random hex, as stores give them).
    todo = [WorkUnit(f"gs://bucket/corpus/2026/part-{k // 100:06d}.parquet",
                     f"md5Hash:{hashlib.md5(str(k // 100).encode()).hexdigest()}:size={100_000_000 + k // 100}",
                     (k % 100) * 10000, (k % 100 + 1) * 10000, (k % 100,), text_bytes=5_000_000 + k % 997)
            for k in range(units)]
    started = time.perf_counter()
    shards = OutputAdmin(output).write_plan(settings.run_id, todo)
    pipeline = beam.Pipeline(runner=DirectRunner())
    build_graph(pipeline, JobPlan(shards, [], ([], [])), settings)
    graph = len(pipeline.to_runner_api().SerializeToString())
    seconds = time.perf_counter() - started
    inline = beam.Pipeline(runner=DirectRunner())
    _ = inline | beam.Create(todo, reshuffle=False)
    return {"units": units, "shards": len(shards), "seconds": seconds, "graph_bytes": graph,
            "units_in_graph_bytes": len(inline.to_runner_api().SerializeToString())}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--row-group", type=int, default=10_000)
    parser.add_argument("--checkpoint-every", type=int, default=10_000)
    parser.add_argument("--units", type=int, default=0, help="size the graph of this many synthetic units instead")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # the fresh launcher process
        kind, rest = args.child[0], args.child[1:]
        result = synthetic(int(rest[0]), rest[1]) if kind == "units" else launch(rest)
        print(json.dumps({**result, "peak_rss_mib": round(peak_rss_mib(), 1)}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.units:
            child = ["units", str(args.units), f"{tmp}/out"]
        else:
            started = time.perf_counter()
            generate(Path(tmp) / "in", args.rows, args.files, args.row_group)
            print(f"generated {args.rows} rows in {args.files} files in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
            child = ["run", "--input", f"{tmp}/in", "--output", f"{tmp}/out",
                     "--checkpoint-every", str(args.checkpoint_every), "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, __file__, "--child", *child], env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(result))
        return
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    for key, value in result.items():
        print(f"{key:22} {value}")


if __name__ == "__main__":
    main()
