"""Search: wall time and peak memory of ``docembed search``'s exact nearest-neighbour pass
(``docembed.use.search.search``) over a large output, per stored dtype, against what a user would do
without docembed.

    python bench/search.py [--rows 1000000] [--dim 384] [--parts 20] [--repeats 2] [--out bench/results/search-1000000.txt]

Builds one synthetic output per dtype (float32, int8, binary) of ``--rows`` random unit vectors in the real
output format, written with docembed's own code: each part's ``embedding`` column made by ``vectors.column``
(as a commit makes it), published with ``UnitStore.write_part`` and committed with ``UnitStore.mark_done``;
int8 calibrated on the first part (``UnitStore.quantization_ranges``, as the first commit pins it); a
manifest with the fingerprint and pass-through settings ``read_recipe`` reads. All three outputs hold the
same vectors. Then times ``search`` (k=10) for 1 and for 10 queries per dtype, each configuration in a fresh
process: the median wall time of ``--repeats`` calls (the parts in the page cache, as after the first), and
the process's RSS before the first call and its peak during the calls (VmHWM, reset at the start). Query vectors: fresh random unit vectors,
quantized as the output's were.

The baseline, measured the same way in a fresh process right after each docembed configuration, in the
same invocation (the machine is shared: only ratios within one invocation compare): the whole
``embedding`` column loaded with pyarrow (``pyarrow.dataset.dataset(folder).to_table(columns=
["embedding"])``, flattened to one numpy matrix), then scored at once: float32, cosine by one matrix
product; int8, the matrix decoded with ``vectors.dequantize`` first; binary, 128 added back to the
packed bytes and the Hamming distance as ``np.bitwise_count`` of the XOR; top k by ``np.argpartition``.
Each call times the load and the search together. Both sides' best k scores of the first query are
checked equal. The temporary outputs are deleted at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from docembed import vectors  # noqa: E402
from docembed.store.admin import OutputAdmin  # noqa: E402
from run import cpu  # noqa: E402  (bench/run.py, beside this script)

DTYPES = ("float32", "int8", "binary")
QUERY_COUNTS = (1, 10)
K = 10


def machine() -> str:
    """The CPU, its cores and vector-instruction flags, and the libraries that do the work."""
    model, flags = cpu()
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_vpopcntdq", "avx512_vnni", "avx512_bf16") if f in flags]
    return (f"{model}, {os.cpu_count()} cores, flags {' '.join(shown) or 'none of avx2/avx512'}; "
            f"{platform.python_implementation()} {platform.python_version()}, numpy {np.__version__}, "
            f"pyarrow {pa.__version__}")


# --- the synthetic outputs ----------------------------------------------------------------------------------


def build(work: Path, rows: int, dim: int, parts: int) -> dict[str, str]:
    """One output per dtype under ``work``, the same unit vectors in each; returns dtype -> URL."""
    urls = {dtype: str(work / dtype) for dtype in DTYPES}
    stores = {dtype: OutputAdmin(url) for dtype, url in urls.items()}
    rng = np.random.default_rng(0)
    for index, cut in enumerate(np.array_split(np.arange(rows), parts)):
        unit = f"{index:020x}"[-20:]  # unit ids are 20 hex digits
        floats = rng.standard_normal((len(cut), dim), dtype=np.float32)
        floats /= np.linalg.norm(floats, axis=1, keepdims=True)
        ids = pa.array([f"doc-{i:08d}" for i in cut])
        sources = pa.array([f"file-{i % 97}.txt" for i in cut])  # a pass-through column
        for dtype, store in stores.items():
            ranges = store.quantization_ranges(dtype, floats) if dtype in vectors.CALIBRATED else None
            table = pa.table({"id": ids, "embedding": vectors.column(floats, dtype, dim, ranges), "source": sources})
            sink = io.BytesIO()
            pq.write_table(table, sink)  # as a commit writes a part (transforms.commit.parquet_bytes)
            name = store.write_part(unit, sink.getvalue())
            store.mark_done(unit, {"unit_id": unit, "part": name, "part_bytes": sink.tell(), "rejects": None,
                                   "embedded": len(cut), "rejected": 0, "rows": len(cut)})
    for dtype, store in stores.items():
        quantization = store.read_quantization()
        store.write_manifest({
            "fingerprint": {"dim": dim, "model": "synthetic/random-unit-vectors", "model_revision": "none",
                            "normalize": True, "output_dtype": dtype, "long_docs": "truncate"},
            "settings": {"id_column": "id", "passthrough_columns": ["source"]},
            "status": "complete", **({"quantization": quantization} if quantization else {})})
    return urls


def folder_bytes(url: str) -> int:
    return sum(p.stat().st_size for p in Path(url).glob("part-*.parquet"))


# --- one configuration, in a fresh process --------------------------------------------------------------------


def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: its peak)."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(f"{field}:")) / 1024


def reset_peak() -> None:
    """Start VmHWM afresh from the current RSS (Linux 4.0+). Not getrusage's ru_maxrss: a child keeps
    the peak of the process that started it, here the builder's hundreds of MiB."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def measure(url: str, queries: int, repeats: int) -> dict:
    """In this process: median seconds of ``search`` over ``repeats`` calls, the RSS before them and the peak."""
    from docembed.use.recipe import read_recipe
    from docembed.use.search import search

    recipe = read_recipe(url)
    floats = np.random.default_rng(1).standard_normal((queries, recipe.dim), dtype=np.float32)
    floats /= np.linalg.norm(floats, axis=1, keepdims=True)
    wanted = vectors.quantize(floats, recipe.output_dtype, recipe.ranges)
    baseline = status_mib("VmRSS")
    reset_peak()
    seconds, cpu = [], []
    for _ in range(repeats):
        started, used = time.perf_counter(), time.process_time()
        hits = search(url, wanted, k=K, recipe=recipe)
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - used)
    assert len(hits) == queries and all(len(h) == K for h in hits)
    return {"seconds": statistics.median(seconds), "all_seconds": seconds, "cpu_seconds": statistics.median(cpu),
            "baseline_mib": baseline, "peak_mib": status_mib("VmHWM"), "first_scores": [h.score for h in hits[0]]}


def measure_baseline(url: str, queries: int, repeats: int) -> dict:
    """As ``measure``, for the baseline: the whole column loaded with pyarrow, then scored in numpy."""
    import pyarrow.dataset as ds

    from docembed.use.recipe import read_recipe

    recipe = read_recipe(url)  # the dtype, width and int8 calibration, as a user reads them from the manifest
    floats = np.random.default_rng(1).standard_normal((queries, recipe.dim), dtype=np.float32)
    floats /= np.linalg.norm(floats, axis=1, keepdims=True)
    wanted = vectors.quantize(floats, recipe.output_dtype, recipe.ranges)  # the same queries as ``measure``'s
    baseline = status_mib("VmRSS")
    reset_peak()
    seconds, cpu = [], []
    for _ in range(repeats):
        started, used = time.perf_counter(), time.process_time()
        table = ds.dataset(url).to_table(columns=["embedding"])
        matrix = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, recipe.width)
        if recipe.output_dtype == "binary":  # stored as packed bits minus 128; Hamming distance, lower is better
            packed = matrix.view(np.uint8) + np.uint8(128)
            query_bits = wanted.view(np.uint8) + np.uint8(128)
            scores = np.stack([np.bitwise_count(packed ^ q).sum(axis=1) for q in query_bits])
            top = np.argpartition(scores, K, axis=1)[:, :K]
            best = np.sort(np.take_along_axis(scores, top, axis=1), axis=1)
        else:
            if recipe.output_dtype == "int8":
                matrix = vectors.dequantize(matrix, "int8", recipe.ranges)
                query_floats = vectors.dequantize(wanted, "int8", recipe.ranges)
            else:
                query_floats = wanted
            query_floats = query_floats / np.linalg.norm(query_floats, axis=1, keepdims=True)
            scores = (query_floats @ matrix.T) / np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
            top = np.argpartition(-scores, K, axis=1)[:, :K]
            best = np.sort(np.take_along_axis(scores, top, axis=1), axis=1)[:, ::-1]
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - used)
        del table, matrix, scores
    assert best.shape == (queries, K)
    return {"seconds": statistics.median(seconds), "all_seconds": seconds, "cpu_seconds": statistics.median(cpu),
            "baseline_mib": baseline, "peak_mib": status_mib("VmHWM"), "first_scores": best[0].tolist()}


def run_child(mode: str, url: str, count: int, repeats: int) -> dict:
    """One configuration measured in a fresh process (``--measure`` docembed, ``--baseline`` the baseline)."""
    done = subprocess.run([sys.executable, __file__, mode, url, str(count), str(repeats)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--parts", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the report to this file")
    parser.add_argument("--measure", nargs=3, metavar=("URL", "QUERIES", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", nargs=3, metavar=("URL", "QUERIES", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure or args.baseline:  # the child process of one configuration
        child, (url, count, repeats) = (measure, args.measure) if args.measure else (measure_baseline, args.baseline)
        print(json.dumps(child(url, int(count), int(repeats))))
        return
    lines = [(f"Search, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: exact k={K} nearest neighbours "
              f"(docembed.use.search.search) over {args.rows:,} random unit vectors of {args.dim} dimensions in "
              f"{args.parts} parts, against a baseline without docembed (the whole embedding column loaded with "
              "pyarrow.dataset(...).to_table(columns=['embedding']) into one numpy matrix, then scored: matrix product, "
              "int8 decoded by vectors.dequantize first, binary by bitwise_count of the XOR; argpartition top k; "
              f"load + search timed). Median of {args.repeats} calls, each configuration in a fresh process, the "
              "baseline's right after docembed's, parts in the page cache. Growth: peak RSS during the calls (VmHWM) "
              "less the RSS before them. Ratios: docembed / baseline."),
             (f"Command: `python bench/search.py --rows {args.rows} --dim {args.dim} --parts {args.parts} "
              f"--repeats {args.repeats}`"),
             f"Machine: {machine()}", ""]
    print("\n".join(lines), flush=True)
    work = Path(tempfile.mkdtemp(prefix="docembed-search-bench-"))
    began, load = time.perf_counter(), os.getloadavg()
    before = []  # RSS before the calls, MiB, of every child
    try:
        urls = build(work, args.rows, args.dim, args.parts)
        built = time.perf_counter() - began
        print(f"(built the outputs in {built:.0f} s)", flush=True)
        table = [("| stored dtype | parts on disk MB | queries | docembed wall s | docembed CPU s | docembed growth MiB "
                  "| baseline wall s | baseline CPU s | baseline growth MiB | wall ratio | growth ratio |"),
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for dtype, url in urls.items():
            for count in QUERY_COUNTS:
                ours = run_child("--measure", url, count, args.repeats)
                theirs = run_child("--baseline", url, count, args.repeats)
                # The same best k scores (Hamming distances, or cosines up to float32 rounding).
                assert np.allclose(ours["first_scores"], theirs["first_scores"], atol=1e-4), (ours, theirs)
                grown = {name: f["peak_mib"] - f["baseline_mib"] for name, f in (("ours", ours), ("theirs", theirs))}
                before += [ours["baseline_mib"], theirs["baseline_mib"]]
                table.append(f"| {dtype} | {folder_bytes(url) / 1e6:,.0f} | {count} | {ours['seconds']:.2f} | "
                             f"{ours['cpu_seconds']:.2f} | {grown['ours']:,.0f} | {theirs['seconds']:.2f} | "
                             f"{theirs['cpu_seconds']:.2f} | {grown['theirs']:,.0f} | "
                             f"{ours['seconds'] / theirs['seconds']:.2f}x | {grown['ours'] / grown['theirs']:.2f}x |")
                print(table[-1] if len(table) > 3 else "\n".join(table), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Other work on the machine slows the wall time, not the CPU time: the load says how much there was.
    table.append(f"\nRSS before the calls {min(before):.0f} to {max(before):.0f} MiB. "
                 f"Load average (1 min) at the start {load[0]:.1f}, at the end {os.getloadavg()[0]:.1f}; "
                 f"build {built:.0f} s, whole invocation {time.perf_counter() - began:.0f} s.")
    print(table[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines + table) + "\n")


if __name__ == "__main__":
    main()
