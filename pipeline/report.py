"""Report: the run report, ``_reports/<run-id>.json``, its human summary, and a picture of it.

Built on the launcher at the end of a run from the done-markers this run committed. Each marker
carries its unit's raw per-batch model timings, stage seconds, start and commit times and the peak
memory of the worker process that committed it, so merging several worker processes is exact:
latency percentiles are computed over the concatenated per-batch timings of every worker (never
averaged percentiles), stage seconds are summed (worker-seconds, which exceed wall time when
workers run in parallel), and peak memory is the largest of any worker's and the launcher's.
"""

from __future__ import annotations

import resource

import numpy as np

from pipeline.output import REPORTS, OutputAdmin, marker_totals
from transforms import storage
from transforms.errors import OutputError

STAGES = ("read", "tokenize", "forward", "write")
PERCENTILES = (50, 95, 99, 99.9)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 and p99.9, linearly interpolated between the nearest ranks (numpy's default)."""
    if not values:
        return {f"p{q:g}": 0.0 for q in PERCENTILES}
    return {f"p{q:g}": float(np.percentile(values, q)) for q in PERCENTILES}


TRUNCATION_WARNING_SHARE = 0.10  # above this share of truncated documents, a run says so plainly


def coverage(mode: str, docs: int, truncated: int, windows: int, text_tokens: int, dropped: int,
             window: int) -> list[tuple[str, str]]:
    """What of the texts the vectors cover, as (label, line) pairs for the summary and the report.
    Under ``truncate`` with more than 10% of documents cut, a plain warning with the tokens lost."""
    if mode != "truncate":
        per = "one row each" if mode == "chunks" else "averaged into one vector per document"
        return [("windows", f"{windows} windows of up to {window} tokens for {docs} documents "
                            f"({per}); {text_tokens} text tokens, all embedded")]
    share = truncated / docs if docs else 0.0
    lost = dropped / text_tokens if text_tokens else 0.0
    lines = [("truncated", f"{truncated} ({100 * share:.1f}% of embedded) cut to the {window}-token window, "
                           f"dropping {dropped} of {text_tokens} text tokens ({100 * lost:.1f}%)")]
    if share > TRUNCATION_WARNING_SHARE:
        lines.append(("WARNING", f"{100 * share:.0f}% of documents are longer than the window and "
                                 f"{100 * lost:.0f}% of the text never reached the model; "
                                 "--long-docs mean or --long-docs chunks embeds whole texts"))
    return lines


def hint(shares: dict[str, float]) -> str:
    """Where to optimise first (the model, then preprocessing, then I/O, then start-up), from the
    stage shares of wall time."""
    if shares.get("forward", 0) > 0.7:
        return ("model-bound (forward > 70%): quantize (--precision int8 on CPUs with VNNI, fp16/bf16 on a "
                "GPU), a smaller model, or better hardware")
    if shares.get("tokenize", 0) > 0.3:
        return "preprocessing-bound (tokenize > 30%): more CPU per worker, or more workers"
    if shares.get("read", 0) + shares.get("write", 0) > 0.3:
        return "I/O-bound (read + write > 30%): larger units, storage closer to the workers"
    if shares.get("other", 0) > 0.3:
        return ("start-up-bound (start-up, model load and planning > 30%): fixed costs dominate a run this "
                "small; give it more documents per run")
    return "balanced: no stage dominates"


def build(run_id: str, markers: dict[str, dict], wall_s: float, started_at: float, settings, workers_flag: int,
          cost_per_hour: float | None) -> dict:
    mine = sorted((m for m in markers.values() if m.get("run_id") == run_id), key=lambda m: m["committed_at"])
    batches = [b for m in mine for b in m.get("batch_stats", [])]
    totals = marker_totals(mine)
    docs, tokens, padded = totals["embedded"], totals["tokens"], totals["padded_tokens"]
    stage_s = {k: sum(m.get("seconds", {}).get(k, 0.0) for m in mine) for k in STAGES}
    workers = {(m["worker"]["host"], m["worker"]["pid"]) for m in mine if m.get("worker")}
    capacity = wall_s * max(1, len(workers))  # worker-seconds available to the stages
    stage_s["other"] = max(0.0, capacity - sum(stage_s.values()))
    shares = {k: (v / capacity if capacity else 0.0) for k, v in stage_s.items()}
    # The host path (everything the CPU does around the model): the tokens/s it could feed a faster
    # model or a GPU, were the forward pass free.
    host_s = stage_s["read"] + stage_s["tokenize"] + stage_s["write"]
    peak_rss = max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
                   + [m["worker"]["peak_rss_mib"] for m in mine if m.get("worker")])
    gpu = [m["worker"]["gpu_peak_mib"] for m in mine if m.get("worker", {}).get("gpu_peak_mib") is not None]
    made_at = next((m["numerics"] for m in mine if m.get("numerics")), {})  # as the workers resolved them
    report = {
        "run_id": run_id,
        "output": storage.redact(settings.output),
        "wall_s": wall_s,
        # From the first unit's start to the last commit: what the four stages account for.
        "processing_s": (mine[-1]["committed_at"] - min(m["started_at"] for m in mine)) if mine else 0.0,
        "units": len(mine),
        "docs_embedded": docs,
        "docs_rejected": totals["rejected"],
        "docs_truncated": totals["truncated"],
        "long_docs": settings.long_docs,
        "window": settings.max_seq_length,
        "windows": totals["windows"],
        "rows": totals["rows"],
        "tokens": tokens,
        "text_tokens": totals["text_tokens"],
        "dropped_tokens": totals["dropped_tokens"],
        "docs_per_s": docs / wall_s if wall_s else 0.0,
        "tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "batches": len(batches),
        "batch_latency_ms": {k: v * 1000 for k, v in percentiles([b[3] for b in batches]).items()},
        "stage_s": stage_s,
        "stage_share": shares,
        "host_s": host_s,
        "host_tokens_per_s": tokens / host_s if host_s else None,
        "padding_share": (padded - tokens) / tokens if tokens else 0.0,
        "peak_rss_mib": peak_rss,
        "peak_gpu_mib": max(gpu) if gpu else None,
        "device": made_at.get("device", settings.device),
        "precision": made_at.get("precision", settings.precision),
        "threads": settings.threads or None,
        "workers": max(len(workers), workers_flag or 1),
        "cost_per_hour": cost_per_hour,
        "cost_per_1000_docs": (cost_per_hour * wall_s / 3600 / docs * 1000) if cost_per_hour and docs else None,
        "hint": hint(shares),
        "timeline": [[round(m["committed_at"] - started_at, 3), m["embedded"]] for m in mine],
        "batch_latencies_s": [b[3] for b in batches],
    }
    return report


def read(output_url: str, run_id: str | None = None) -> dict:
    output = OutputAdmin(output_url)
    names = output.report_names()
    if run_id:
        names = [n for n in names if n == f"{run_id}.json"]
    if not names:
        raise OutputError(f"{output_url} has no run report{' for ' + run_id if run_id else ''} under {REPORTS}/")
    return output.read_report(names[-1])  # run ids start with a timestamp: the last is the newest


def format_report(r: dict, counts: bool = True) -> str:
    """The report as text; ``counts=False`` leaves out what the run's own summary already says."""
    lat = r["batch_latency_ms"]
    stages = ", ".join(f"{k} {r['stage_s'][k]:.1f}s ({100 * r['stage_share'][k]:.0f}%)"
                       for k in (*STAGES, "other"))
    cost = (f"{r['cost_per_1000_docs']:.4f} per 1000 docs (at {r['cost_per_hour']}/hour)"
            if r.get("cost_per_1000_docs") is not None else "not computed (pass --cost-per-hour)")
    gpu = f", GPU peak {r['peak_gpu_mib']:.0f} MiB" if r.get("peak_gpu_mib") is not None else ""
    covered = coverage(r.get("long_docs", "truncate"), r["docs_embedded"], r["docs_truncated"],
                       r.get("windows", r["docs_embedded"]), r.get("text_tokens", 0), r.get("dropped_tokens", 0),
                       r.get("window", 0))
    head = [
        f"  counts     {r['docs_embedded']} documents, {r.get('rows', r['docs_embedded'])} rows written, "
        f"{r.get('windows', r['docs_embedded'])} windows, {r['tokens']} tokens through the model",
        *(f"  {label:<10} {line}" for label, line in covered),
    ] if counts else []
    return "\n".join([
        *head,
        f"  throughput {r['docs_per_s']:.1f} docs/s, {r['tokens_per_s']:.0f} tokens/s over {r['wall_s']:.1f} s",
        f"  batches    {r['batches']}; model latency p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f}, "
        f"p99 {lat['p99']:.0f}, p99.9 {lat['p99.9']:.0f}",
        f"  stages     {stages}",
        *([f"  host path  read + tokenize + write {r['host_s']:.1f} s against forward {r['stage_s']['forward']:.1f} s: "
           f"{r['host_tokens_per_s']:,.0f} tokens/s is what the host stages could feed a free model"]
          if r.get("host_tokens_per_s") else []),
        f"  padding    {100 * r['padding_share']:.1f}% of real tokens",
        f"  memory     peak RSS {r['peak_rss_mib']:.0f} MiB{gpu}",
        f"  setup      {r['device']}, {r['precision']}, threads {r['threads'] or 'default'}, workers {r['workers']}",
        f"  cost       {cost}",
        f"  hint       {r['hint']}",
    ])


def draw_png(r: dict, path: str) -> None:
    """Throughput over the run, the batch-latency histogram and the stage breakdown, in one picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    times = [0.0] + [t for t, _ in r["timeline"]]
    docs = np.cumsum([0] + [n for _, n in r["timeline"]])
    a.plot(times, docs, marker="o", markersize=3)
    a.set(title=f"Documents embedded over the run ({r['docs_per_s']:.1f} docs/s)", xlabel="seconds since start",
          ylabel="documents committed")
    lat = np.array(r["batch_latencies_s"]) * 1000
    b.hist(lat, bins=min(40, max(5, len(lat) // 2)), color="tab:orange")
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        b.axvline(r["batch_latency_ms"][q], color="k", linestyle=style, label=f"{q} {r['batch_latency_ms'][q]:.0f} ms")
    b.set(title=f"Model latency per batch ({r['batches']} batches)", xlabel="ms", ylabel="batches")
    b.legend(loc="upper center")
    names = [*STAGES, "other"]
    c.barh(names, [r["stage_s"][k] for k in names], color="tab:green")
    for i, k in enumerate(names):
        c.text(r["stage_s"][k], i, f" {100 * r['stage_share'][k]:.0f}%", va="center")
    c.set(title="Where the time went (worker-seconds)", xlabel="seconds")
    fig.suptitle(f"docembed run {r['run_id']}: {r['docs_embedded']} documents, {r['device']} {r['precision']}; "
                 f"{r['hint'].split(':')[0]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

