"""The duplicate-id job's time and memory as the corpus grows, through docembed's own code.

Generates ``--rows`` ids in ``--files`` Parquet files (``launcher.generate``: short texts; one row in
1,000 repeats an earlier id), then, in a fresh process, does what ``docembed run`` does before its
embedding job: plans, guards, writes the plan and the output's record (``before_job``), and runs the
duplicate-id job (``find_duplicates``) on the chosen runner. It prints the job's wall time, the repeats
it found, and peak memory: on the DirectRunner the launcher process's (the whole shuffle runs in it),
on Dask each worker process's (``--dask-workers`` single-thread workers of a local cluster, each
started for this measurement).

    python bench/dedup.py --rows 1000000                      # DirectRunner
    python bench/dedup.py --rows 1000000 --runner dask        # 2 Dask workers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from launcher import generate  # noqa: E402

REPEAT_EVERY = 1000


def add_repeats(folder: Path) -> int:
    """Every REPEAT_EVERY-th row of each file takes the id of the row before it; returns how many."""
    count = 0
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path)
        ids = table.column("id").to_pylist()
        for row in range(REPEAT_EVERY, len(ids), REPEAT_EVERY):
            ids[row] = ids[row - 1]
            count += 1
        pq.write_table(table.set_column(0, "id", pa.array(ids, pa.string())), path, row_group_size=10_000)
    return count


def child(argv: list[str]) -> dict:
    """In this process: the launcher's bookkeeping, then the duplicate-id job."""
    from docembed.pipeline.options import is_dask_runner, is_local_runner
    from docembed.pipeline.execute import find_duplicates
    from docembed.pipeline.run import before_job, prepare

    options, opts, output, plan, settings = prepare(argv)
    job = before_job(opts, output, plan, settings, is_dask_runner(options))
    rss_before = peak_rss_mib()
    started = time.perf_counter()
    find_duplicates(options, job, is_local_runner(options))
    seconds = time.perf_counter() - started
    repeats = 0
    for unit in job.resume.todo:
        repeats += len(output.read_repeats(settings.run_id, unit.unit_id))
    return {"rows": plan.rows, "units": len(job.resume.todo), "seconds": round(seconds, 1), "repeats": repeats,
            "launcher_peak_rss_mib": round(peak_rss_mib(), 1), "launcher_rss_before_job_mib": round(rss_before, 1)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dask_cluster(workers: int, tmp: str):
    """A scheduler and single-thread worker processes from this environment; returns (address, procs)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bindir = Path(sys.executable).parent
    procs = [subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(3)
    for k in range(workers):
        procs.append(subprocess.Popen([str(bindir / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                                       "--no-nanny", "--no-dashboard", "--memory-limit", "0"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(5)
    return f"127.0.0.1:{port}", procs


def worker_peaks(address: str) -> list[float]:
    from distributed import Client

    with Client(address) as client:
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return sorted(round(v, 1) for v in peaks.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=10_000)
    parser.add_argument("--runner", choices=["direct", "dask"], default="direct")
    parser.add_argument("--dask-workers", type=int, default=2)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "in", args.rows, args.files, 10_000)
        planted = add_repeats(Path(tmp) / "in")
        argv = ["--input", f"{tmp}/in", "--output", f"{tmp}/out", "--checkpoint-every", str(args.checkpoint_every),
                "--on-duplicate-id", "keep-first", "--no-progress"]
        procs = []
        if args.runner == "dask":
            address, procs = dask_cluster(args.dask_workers, tmp)
            argv += ["--runner", "DaskRunner", "--dask_client_address", address]
        try:
            env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
            done = subprocess.run([sys.executable, __file__, "--child", *argv], env=env, capture_output=True,
                                  text=True)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if procs:
                result["worker_peak_rss_mib"] = worker_peaks(address)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    result.update(planted_repeats=planted, runner=args.runner)
    assert result["repeats"] == planted, result
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
