"""Simulated accelerator: does the real host path keep a GPU busy? Measured without a GPU.

    python bench/accelerator_sim.py [--docs 80000] [--model bert-base] [--tokens-per-s 1000000,200000] \
        [--cards l4,h100] [--cores 1,2] [--repeats 3] [--out bench/results/accelerator-sim.md]

Each run is the real ``docembed run`` (reading Parquet, tokenizing with the real all-MiniLM-L6-v2
tokenizer, which is BERT-base's uncased WordPiece, length-sorted batching, collation, writing,
commits) in a fresh process, with the runner, harness threads and batch sizes of
``jobs/dataflow-gpu.yaml``: one SDK process whose DirectRunner runs ``number_of_worker_harness_threads``
threads (``direct_running_mode multi_threading``), batches of 64-256 documents up to 65,536 padded
tokens, a unit every ``checkpoint-every`` documents. Only the model is a stand-in: the Embedder's
forward pass (``forward_with_norms``), which on a GPU is the host dispatching kernels while the
device computes, then waiting for the vectors. The stand-in

- holds the GIL for the kernel launches (eager PyTorch dispatches each op from Python: about
  ``LAUNCH_US_PER_OP`` us for each of ``OPS_PER_LAYER`` ops a layer), as the real call does;
- then sleeps, with the GIL released as a thread blocked in a CUDA synchronisation releases it, until
  the device would be done: the batch's FLOPs (padded tokens x layers x the encoder's matrix products,
  plus attention's quadratic term at the batch's width) at the card's fp16 rate times ``--efficiency``,
  or the time to read the weights at its memory bandwidth if that is longer (the roofline);
- serialises the harness threads on one device (a lock), as one GPU runs one thread's kernels after
  the other's;
- returns a deterministic vector per document (a row of a fixed random table picked by its first
  token), so the output is written and committed as usual.

The device is busy for the sum of those intervals. Two figures per run: the busy share of the steady
window (first forward to last), and of the whole process (start-up included). A run with a device
that takes no time (``host``) measures what the host alone sustains, on 1 and 2 cores (CPU affinity,
and as many tokenizer threads): fitted as serial + parallel seconds (Amdahl), it predicts what 8 or
16 cores feed, which with the card's roofline rate gives the predictions in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GPU_JOB = REPO / "jobs" / "dataflow-gpu.yaml"

# Encoders by shape (their config.json): BERT-base (BAAI/bge-base-en-v1.5, 110 M parameters) and
# MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, 22 M).
MODELS = {
    "bert-base": {"layers": 12, "hidden": 768, "ffn": 3072, "params": 110e6},
    "minilm": {"layers": 6, "hidden": 384, "ffn": 1536, "params": 22.7e6},
}
# Published dense fp16 tensor-core TFLOPS (the datasheets quote twice these "with sparsity") and
# memory bandwidth: NVIDIA L4 datasheet (121 TFLOPS from 242 sparse, 300 GB/s), H100 SXM datasheet
# (989 TFLOPS from 1,979 sparse, 3.35 TB/s), H200 datasheet (989, 4.8 TB/s), A100 80GB SXM (312, 2.04 TB/s),
# T4 datasheet (65 TFLOPS mixed precision, 320 GB/s).
CARDS = {
    "l4": {"tflops": 121, "gbps": 300, "host": "g2-standard-8 (8 vCPUs)", "host_cores": 8},
    "h100": {"tflops": 989, "gbps": 3350, "host": "a 16-core host", "host_cores": 16},
    "h200": {"tflops": 989, "gbps": 4800, "host": "a 16-core host", "host_cores": 16},
    "a100": {"tflops": 312, "gbps": 2039, "host": "a 12-vCPU host (a2-highgpu-1g)", "host_cores": 12},
    "t4": {"tflops": 65, "gbps": 320, "host": "an 8-vCPU host", "host_cores": 8},
}
# Share of the card's peak an eager-PyTorch encoder reaches on long fp16 batches (SDPA attention):
# an assumption, the number a GPU run (bench/gpu_check.sh) checks.
EFFICIENCY = 0.5
OPS_PER_LAYER = 25  # kernels an eager BERT layer launches (projections, bias, softmax, norms, GELU)
LAUNCH_US_PER_OP = 8.0  # Python dispatch of one eager op (PyTorch's commonly measured 5-10 us)
REFERENCE_WIDTH = 256  # --tokens-per-s is the rate at this batch width


def flops_per_token(model: dict, width: int) -> float:
    """Forward FLOPs per padded token: each layer's matrix products (QKV, output, two FFN: 2 x (4d^2 +
    2 d ffn)) and attention's scores and mixing (4 x width x d)."""
    d, f = model["hidden"], model["ffn"]
    return model["layers"] * (2 * (4 * d * d + 2 * d * f) + 4 * width * d)


def batch_seconds(model: dict, rows: int, width: int, flops_per_s: float, bytes_per_s: float) -> float:
    """The roofline: the longer of computing the batch and reading the fp16 weights once."""
    return max(rows * width * flops_per_token(model, width) / flops_per_s, 2 * model["params"] / bytes_per_s)


def launch_seconds(model: dict) -> float:
    return model["layers"] * OPS_PER_LAYER * LAUNCH_US_PER_OP * 1e-6


class SimulatedDevice:
    """One accelerator shared by the process's harness threads; records when it is busy."""

    def __init__(self, model: dict, flops_per_s: float, bytes_per_s: float, dim: int):
        import numpy as np

        self.model, self.flops_per_s, self.bytes_per_s = model, flops_per_s, bytes_per_s
        self.launch_s = launch_seconds(model)
        self.intervals: list[tuple[float, float, int]] = []
        self.setup = threading.local()  # set while a thread probes the canaries (not the units' work)
        self._lock = threading.Lock()
        table = np.random.default_rng(0).standard_normal((4096, dim)).astype(np.float32)
        self._table = table / np.linalg.norm(table, axis=1, keepdims=True)

    def forward_with_norms(self, embedder, features: dict):
        import numpy as np

        ids = features["input_ids"]
        rows, width = ids.shape
        seconds = 0.0 if self.flops_per_s == float("inf") else batch_seconds(
            self.model, rows, width, self.flops_per_s, self.bytes_per_s)
        with self._lock:
            start = time.perf_counter()
            while time.perf_counter() - start < self.launch_s:  # kernel launches hold the GIL
                pass
            left = seconds - (time.perf_counter() - start)
            if left > 0:
                time.sleep(left)  # the host waits for the device with the GIL released
            end = time.perf_counter()
        if not getattr(self.setup, "on", False):
            self.intervals.append((start, end, rows * width))
        picked = ids[:, min(1, width - 1)].numpy() % len(self._table)
        vectors = self._table[picked][:, :embedder.dim]
        return vectors, np.ones(rows, dtype=np.float32)


def child(spec: dict) -> dict:
    """One docembed run in this process with the simulated device; its timings as a dict."""
    os.sched_setaffinity(0, list(sorted(os.sched_getaffinity(0)))[:spec["cores"]])
    from docembed.model import canaries
    from docembed.model import embedder as embedder_module
    from docembed.pipeline.run import run

    model = MODELS[spec["model"]]
    device = SimulatedDevice(model, spec["flops_per_s"], spec["bytes_per_s"], 384)
    embedder_module.Embedder.forward_with_norms = lambda self, features: device.forward_with_norms(self, features)
    embedder_module.Embedder.frees_host = property(lambda self: True)  # the host path of a GPU worker
    probe = canaries.probe

    def probe_in_setup(*args, **kwargs):
        device.setup.on = True
        try:
            return probe(*args, **kwargs)
        finally:
            device.setup.on = False

    canaries.probe = probe_in_setup
    started, stolen = time.perf_counter(), steal_seconds()
    summary = run(spec["argv"])
    wall, stolen = time.perf_counter() - started, steal_seconds() - stolen
    spans = sorted(device.intervals)
    busy = sum(e - s for s, e, _ in spans)
    window = spans[-1][1] - spans[0][0]
    gaps = sorted(((b[0] - a[1], a[1] - started) for a, b in zip(spans, spans[1:])), reverse=True)[:5]
    return {"wall": wall, "steal": stolen, "busy": busy, "window": window, "first_forward": spans[0][0] - started,
            "padded_tokens": sum(n for _, _, n in spans), "batches": len(spans), "docs": summary.get("embedded"),
            "dropped_tokens": summary.get("dropped_tokens"),
            "largest_gaps": [[round(g, 3), round(at, 2)] for g, at in gaps]}


def spawn(spec: dict, gil_profile: Path | None = None) -> dict:
    """One run in a fresh process; with ``gil_profile`` (a file for py-spy's samples) sampled by py-spy
    for the seconds the workers' threads held the GIL (``gil_seconds``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAYON_NUM_THREADS": str(spec["cores"]),
           "TOKENIZERS_PARALLELISM": "true"}
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    if gil_profile:
        command = [py_spy(), "record", "--gil", "--nonblocking", "--rate", str(GIL_RATE), "--format", "raw",
                   "-o", str(gil_profile), "--", *command]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"simulated run failed:\n{done.stderr[-4000:]}")
    result = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
    if gil_profile:
        result["gil_seconds"] = gil_seconds(gil_profile.read_text())
        result["gil_by_part"] = gil_by_part(gil_profile.read_text())
    return result


GIL_RATE = 100  # py-spy samples a second


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("--gil-profile needs py-spy (pip install -r requirements.txt)")
    return found


# What holds the GIL, by the first of these frames found in a sample's stack (gil_by_part).
GIL_PARTS = (
    ("kernel launches (the stand-in's, an assumption about eager PyTorch)", ("SimulatedDevice.forward_with_norms",)),
    ("the tokenizer's output turned into id arrays (Embedder.encode, first_windows)",
     ("Embedder.encode", "first_windows", "Embedder._encode", "cap_text")),
    ("collation (prepare_ids)", ("prepare_ids",)),
    ("the unit's quality statistics (quality.stats)", ("_non_letters", "mostly_non_letters", "unit_stats")),
    ("batch planning", ("_best_sizes", "_best_starts", "plan_batches")),
    ("commit (Parquet, markers)", ("commit", "parquet_bytes")),
    ("reading the unit", ("transforms/read.py",)),
    ("the rest of the runner's worker threads (Beam's bundles and coders, per-unit bookkeeping)",
     ("apache_beam", "grpc")),
)


def _unit_work(raw: str):
    """(stack, samples) of py-spy's raw lines that are the unit work (see gil_seconds)."""
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if "(threading.py" in stack and "EmbedUnit.setup" not in stack and "frozen importlib" not in stack:
            yield stack, int(count)


def gil_by_part(raw: str) -> dict[str, float]:
    """Seconds of ``gil_seconds`` by what held the GIL (``GIL_PARTS``; "other" for the rest)."""
    parts: dict[str, float] = {}
    for stack, count in _unit_work(raw):
        part = next((name for name, frames in GIL_PARTS if any(f in stack for f in frames)), "other")
        parts[part] = parts.get(part, 0.0) + count / GIL_RATE
    return parts


def gil_seconds(raw: str) -> float:
    """Seconds the unit work held the GIL, from py-spy's raw samples ("frames count" a line) taken with
    ``--gil`` (only the thread holding the GIL is sampled): threads started by ``threading`` (the
    runner's workers and docembed's helpers), leaving out the launcher's main thread (whose samples
    start at the script's module, named or not), samples with no Python frame, the model load and
    imports (start-up, not the steady window's work)."""
    return sum(count for _, count in _unit_work(raw)) / GIL_RATE


def job_settings() -> dict:
    """The GPU job file's batch sizes, unit size, count of dropped tokens and harness threads."""
    job = yaml.safe_load(GPU_JOB.read_text())
    d, b = job["docembed"], job["beam"]
    return {"min-batch-size": d["min-batch-size"], "max-batch-size": d["max-batch-size"],
            "max-batch-tokens": d["max-batch-tokens"], "checkpoint-every": d["checkpoint-every"],
            "count-dropped": d.get("count-dropped", "exact"), "threads": b["number_of_worker_harness_threads"]}


def other_count(job: dict) -> str:
    """The --count-dropped the job file does not use: a host-only run with it shows what it costs."""
    return "exact" if job["count-dropped"] == "estimate" else "estimate"


def argv_for(corpus: Path, out: Path, job: dict) -> list[str]:
    return ["--input", str(corpus), "--output", str(out), "--device", "cpu", "--precision", "fp32",
            "--min-batch-size", str(job["min-batch-size"]), "--max-batch-size", str(job["max-batch-size"]),
            "--max-batch-tokens", str(job["max-batch-tokens"]), "--checkpoint-every", str(job["checkpoint-every"]),
            "--count-dropped", job["count-dropped"], "--runner", "DirectRunner", "--direct_running_mode", "multi_threading",
            "--direct_num_workers", str(job["threads"])]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--docs", type=int, default=80000)
    parser.add_argument("--model", choices=sorted(MODELS), default="bert-base")
    parser.add_argument("--tokens-per-s", default="1000000,250000",
                        help=f"the simulated device's rates for --model at width {REFERENCE_WIDTH}, comma-separated")
    parser.add_argument("--cores", default="1,2", help="host core counts for the host-only runs")
    parser.add_argument("--cards", default="l4,h100", help="cards to predict for")
    parser.add_argument("--efficiency", type=float, default=EFFICIENCY)
    parser.add_argument("--threads", type=int, help="harness threads instead of the job file's")
    parser.add_argument("--checkpoint-every", type=int, help="documents a unit instead of the job file's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gil-profile", action="store_true",
                        help="add a host-only run on all cores under py-spy: the seconds the GIL is held, "
                             "measured, give the serial part")
    parser.add_argument("--out", default="bench/results/accelerator-sim.md")
    parser.add_argument("--from-json", help="render the report again from a run's saved .json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        args = argparse.Namespace(**{**saved["args"], "efficiency": args.efficiency, "cards": args.cards})
        cores = [int(c) for c in args.cores.split(",")]
        all_cores = int(next(n for n in saved["runs"] if n.count("-") == 2).split("-")[1])
        print(render(saved["runs"], args, saved["job"], cores, all_cores))
        return
    work = Path(tempfile.mkdtemp(prefix="docembed-accel-sim-"))
    corpus = work / "corpus.parquet"
    subprocess.run([sys.executable, "bench/corpus.py", "--docs", str(args.docs), "--cycle", "--out", str(corpus)],
                   cwd=REPO, check=True, capture_output=True)
    job = job_settings()
    job["threads"] = args.threads or job["threads"]
    job["checkpoint-every"] = args.checkpoint_every or job["checkpoint-every"]
    model = MODELS[args.model]
    rates = [float(r) for r in args.tokens_per_s.split(",")]
    cores = [int(c) for c in args.cores.split(",")]
    all_cores = len(os.sched_getaffinity(0))
    runs: dict[str, list[dict]] = {}
    started = time.time()
    for r in range(args.repeats):
        devices = [(f"device-{rate:.0f}", rate * flops_per_token(model, REFERENCE_WIDTH), all_cores) for rate in rates]
        hosts = [(f"host-{c}", float("inf"), c) for c in cores] + [(f"host-{all_cores}-{other_count(job)}",
                                                                    float("inf"), all_cores)]
        hosts += [(f"gil-{all_cores}", float("inf"), all_cores)] if args.gil_profile else []
        for name, flops, n in devices + hosts:
            counted = {**job, "count-dropped": name.split("-")[2]} if name.count("-") == 2 else job
            spec = {"argv": argv_for(corpus, work / f"{name}-{r}", counted), "model": args.model, "cores": n,
                    "flops_per_s": flops, "bytes_per_s": float("inf")}
            profile = work / f"{name}-{r}.gil.txt" if name.startswith("gil") else None
            runs.setdefault(name, []).append(spawn(spec, profile))
            print(name, r, json.dumps(runs[name][-1]), flush=True)
    args.date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    report = render(runs, args, job, cores, all_cores)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "job": job, "runs": runs}, indent=1))
    print(report)


def med(values) -> float:
    return statistics.median(values)


def spread(values: list[float], fmt: str = "{:.1%}") -> str:
    return f"{fmt.format(med(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def amdahl(runs: dict, cores: list[int]) -> tuple[float, float]:
    """(serial, parallel) seconds of the steady window per padded token, t(n) = serial + parallel / n,
    fitted to the host-only runs on the fewest and most cores of each repeat (run one after the other,
    so a machine whose speed drifts between repeats skews the fit less); the medians over repeats."""
    lo, hi = min(cores), max(cores)
    fits = []
    for a, b in zip(runs[f"host-{lo}"], runs[f"host-{hi}"]):
        t_lo, t_hi = a["window"] / a["padded_tokens"], b["window"] / b["padded_tokens"]
        parallel = 0.0 if lo == hi else max(0.0, (t_lo - t_hi) / (1 / lo - 1 / hi))
        fits.append((max(0.0, t_lo - parallel / lo), parallel))
    return med(f[0] for f in fits), med(f[1] for f in fits)


def steal_seconds() -> float:
    """CPU time the hypervisor gave to others so far (/proc/stat), in seconds: a shared machine's noise."""
    fields = open("/proc/stat").readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


# How the tokens past the window were counted, by a run's name (older reports: "uncounted").
COUNTS = {"exact": "counting the tokens past the window (--count-dropped exact)",
          "estimate": "estimating the tokens past the window (--count-dropped estimate)",
          "uncounted": "not counting the tokens past the window"}


def render(runs: dict, args, job: dict, cores: list[int], all_cores: int) -> str:
    model = MODELS[args.model]
    main_count = COUNTS[job.get("count-dropped", "exact")]
    variant = next(n for n in runs if n.count("-") == 2)  # host-<cores>-<count>
    other = COUNTS[variant.split("-")[2]]
    flags = set(open("/proc/cpuinfo").read().split())
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    lines = [
        f"Simulated accelerator, {getattr(args, 'date', None) or time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{args.docs} documents, "
        f"{args.model}-sized stand-in at {args.tokens_per_s} padded tokens/s (width {REFERENCE_WIDTH}), "
        f"{launch_seconds(model) * 1000:.1f} ms of kernel launches per batch with the GIL held; "
        f"{job['threads']} harness threads, batches {job['min-batch-size']}-{job['max-batch-size']} up to "
        f"{job['max-batch-tokens']} tokens, a unit every {job['checkpoint-every']} documents, "
        f"{main_count} (jobs/dataflow-gpu.yaml); {cpu}, {all_cores} cores (avx512_bf16: {'avx512_bf16' in flags}); "
        f"{args.repeats} interleaved repeats, median (min-max).",
        f"Command: `python bench/accelerator_sim.py --docs {args.docs} --model {args.model} "
        f"--tokens-per-s {args.tokens_per_s} --cores {args.cores} --cards {args.cards} --repeats {args.repeats}"
        + "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("threads", "checkpoint_every")
                  if getattr(args, k, None)) + (" --gil-profile" if getattr(args, "gil_profile", False) else "") + "`",
        "",
        "| run | device busy, steady window | device busy, whole process | padded tokens/s, steady | "
        "padded tokens/s per core | first forward after (s) | whole process (s) | steal (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        device = name.startswith("device")
        n = all_cores if device else int(name.split("-")[1])
        rate = [r["padded_tokens"] / r["window"] for r in rs]
        busy = ([spread([r["busy"] / r["window"] for r in rs]), spread([r["busy"] / r["wall"] for r in rs])]
                if device else ["-", "-"])
        what = (f"device at {int(name.split('-')[1]):,} tokens/s" if device else
                f"host only, {other}" if name == variant else
                "host only, sampled by py-spy --gil --nonblocking" if name.startswith("gil") else "host only")
        lines.append(f"| {what} ({n} cores) | {busy[0]} | {busy[1]} | {spread(rate, '{:,.0f}')} | "
                     f"{med(rate) / n:,.0f} | {med(r['first_forward'] for r in rs):.1f} | "
                     f"{spread([r['wall'] for r in rs], '{:.1f}')} | "
                     + (f"{spread([r['steal'] for r in rs], '{:.1f}')} |" if all("steal" in r for r in rs)
                        else "not recorded |"))
    lines += ["", "Largest idle gaps of the device runs (seconds idle, seconds into the process):", ""]
    lines += [f"- {name}: " + "; ".join(json.dumps(r["largest_gaps"]) for r in rs)
              for name, rs in runs.items() if name.startswith("device")]
    lines.append("")
    serial, parallel = amdahl(runs, cores)
    fit = f"from the host-only runs on {min(cores)} and {max(cores)} cores"
    gil = f"gil-{all_cores}"
    if gil in runs:  # the serial part measured (GIL held), not fitted: two noisy runs' difference swings widely
        lines.append(f"Amdahl fit {fit}: serial {serial * 1e9:.0f} ns + parallel {parallel * 1e9:.0f} ns / cores "
                     "(not used: see the GIL's figure below).")
        serial = med(r["gil_seconds"] / r["padded_tokens"] for r in runs[gil])
        parallel = max(0.0, (med(r["window"] / r["padded_tokens"] for r in runs[f"host-{all_cores}"]) - serial)
                       * all_cores)
        fit = (f"serial: the GIL held by the unit work, {spread([r['gil_seconds'] for r in runs[gil]], '{:.1f}')} s "
               f"per run, sampled by py-spy; parallel: the rest of the host-only run on {all_cores} cores")
    # How the tokens past the window are counted changes parallel work (the tokenizer's) only: the same serial part.
    varied = med(r["window"] / r["padded_tokens"] for r in runs[variant])
    parallel_u = max(0.0, (varied - serial) * all_cores)
    need = [f"{p / (1 / 1e6 - serial):.1f}" if serial < 1 / 1e6 else "none (the serial part alone is slower)"
            for p in (parallel, parallel_u)]
    if gil in runs and all("gil_by_part" in r for r in runs[gil]):
        parts = sorted({p for r in runs[gil] for p in r["gil_by_part"]},
                       key=lambda p: -sum(r["gil_by_part"].get(p, 0.0) for r in runs[gil]))
        held = med(r["gil_seconds"] for r in runs[gil])
        lines += ["", "GIL held by (seconds a profiled run, median; share of the median total):", "",
                  "| part | seconds | share |", "|---|---|---|"]
        for p in parts:
            seconds = med(r["gil_by_part"].get(p, 0.0) for r in runs[gil])
            lines.append(f"| {p} | {seconds:.2f} | {seconds / held:.0%} |")
        lines.append("")
    lines += [f"Host fit (steady window, seconds per padded token; {fit}; {main_count}): serial "
              f"{serial * 1e9:.0f} ns + parallel {parallel * 1e9:.0f} "
              f"ns / cores; {other}, parallel {parallel_u * 1e9:.0f} ns / cores. Cores of this "
              f"machine to feed 1,000,000 padded tokens/s: {need[0]} ({need[1]} {other}); the serial part caps one "
              f"process at {1 / serial:,.0f} padded tokens/s.", "",
              "| card (fp16 dense TFLOPS) | host | device rate at efficiency "
              f"{args.efficiency}, BERT-base / MiniLM (padded tokens/s) | host rate (in brackets: {other}) | "
              "predicted busy, BERT-base / MiniLM |", "|---|---|---|---|---|"]
    for card in args.cards.split(","):
        spec = CARDS[card]
        host, bare = (1 / (serial + p / spec["host_cores"]) for p in (parallel, parallel_u))
        rates = [spec["tflops"] * 1e12 * args.efficiency / flops_per_token(MODELS[m], REFERENCE_WIDTH)
                 for m in ("bert-base", "minilm")]
        busy = [f"{min(1.0, host / r):.0%} ({min(1.0, bare / r):.0%})" for r in rates]
        lines.append(f"| {card} ({spec['tflops']}) | {spec['host']} | {rates[0]:,.0f} / {rates[1]:,.0f} | "
                     f"{host:,.0f} ({bare:,.0f}) | {busy[0]} / {busy[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
