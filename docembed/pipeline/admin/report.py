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

from docembed.quality import drift
from docembed.store.admin import OutputAdmin, marker_totals
from docembed.store.layout import REPORTS, record_key
from docembed.quality import stats as quality
from docembed.store import storage
from docembed.errors import OutputError
from docembed.text import agree, plural

STAGES = ("read", "tokenize", "forward", "write")
PERCENTILES = (50, 95, 99, 99.9)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 and p99.9, linearly interpolated between the nearest ranks (numpy's default)."""
    if not values:
        return {f"p{q:g}": 0.0 for q in PERCENTILES}
    return {f"p{q:g}": float(np.percentile(values, q)) for q in PERCENTILES}


TRUNCATION_WARNING_SHARE = 0.10  # above this share of truncated documents, a run says so plainly


def coverage(mode: str, docs: int, truncated: int, windows: int, text_tokens: int, dropped: int,
             window: int, estimated: bool = False) -> list[tuple[str, str]]:
    """What of the texts the vectors cover, as (label, line) pairs for the summary and the report.
    Under ``truncate`` with more than 10% of documents cut, a plain warning with the tokens lost;
    ``estimated``: the tokens past the window were estimated from characters (``--count-dropped``)."""
    if mode != "truncate":
        per = "one row each" if mode == "chunks" else "averaged into one vector per document"
        return [("windows", f"{plural(windows, 'window')} of up to {window} tokens for {plural(docs, 'document')} "
                            f"({per}); {plural(text_tokens, 'text token')}, all embedded")]
    share = truncated / docs if docs else 0.0
    lost = dropped / text_tokens if text_tokens else 0.0
    lines = [("truncated", f"{truncated} ({100 * share:.1f}% of embedded) cut to the {window}-token window, "
                           f"dropping {'about ' * estimated}{dropped} of {plural(text_tokens, 'text token')} "
                           f"({100 * lost:.1f}%" + (", estimated from characters: --count-dropped estimate)"
                                                    if estimated else ")"))]
    if share > TRUNCATION_WARNING_SHARE:
        lines.append(("WARNING", f"{100 * share:.0f}% of documents are longer than the window and "
                                 f"{100 * lost:.0f}% of the text never reached the model; "
                                 "--long-docs mean or --long-docs chunks embeds whole texts"))
    return lines


def hint(shares: dict[str, float], device: str | None = None, precision: str | None = None,
         cpu_bf16: bool = False) -> str:
    """Where to optimise first (the model, then preprocessing, then I/O, then start-up), from the
    stage shares of wall time. ``device``, ``precision``: what the run's workers embedded at;
    ``cpu_bf16``: whether their CPU has native bf16 (``numerics.resolve``), where an fp32 run is
    offered ``--precision bf16`` first (docs/PERFORMANCE.md: faster than int8, and closer to fp32)."""
    if shares.get("forward", 0) > 0.7:
        bf16 = cpu_bf16 and (device, precision) == ("cpu", "fp32")
        return ("model-bound (forward > 70%): "
                + ("--precision bf16 (this run's CPU has native bf16), or " if bf16 else "")
                + "quantize (--precision int8 on CPUs with VNNI, fp16/bf16 on a GPU), a smaller model, or "
                  "better hardware")
    if shares.get("tokenize", 0) > 0.3:
        return "preprocessing-bound (tokenize > 30%): more CPU per worker, or more workers"
    if shares.get("read", 0) + shares.get("write", 0) > 0.3:
        return "I/O-bound (read + write > 30%): larger units, storage closer to the workers"
    if shares.get("other", 0) > 0.3:
        return ("start-up-bound (start-up, model load and planning > 30%): fixed costs dominate a run this "
                "small; give it more documents per run")
    return "balanced: no stage dominates"


def unjudged(markers: dict[str, dict], reports: list[dict], run_id: str) -> list[str]:
    """Runs whose committed units no report has judged for drift, ``run_id`` aside: runs that ended
    without writing one (killed, stopped, failed while finishing) and that no later run's report took
    up (its ``judged_runs``). So every committed unit is judged by exactly one report, however runs end."""
    judged = {r["run_id"] for r in reports} | {j for r in reports for j in r.get("judged_runs", [])}
    return sorted({m.get("run_id") for m in markers.values()} - judged - {run_id, None})


def build_report(run_id: str, markers: dict[str, dict], wall_s: float, started_at: float, settings, workers_flag: int,
          cost_per_hour: float | None, judged: list[str] = ()) -> dict:
    """The report of run ``run_id`` from the output's done-markers. Its timings, counts and costs are
    the run's own units'; its ``quality``, which drift is judged on, also covers the units of the
    ``judged`` runs (``unjudged``), recorded as ``judged_runs``."""
    mine = sorted((m for m in markers.values() if m.get("run_id") == run_id), key=lambda m: m["committed_at"])
    late = [m for m in markers.values() if m.get("run_id") in set(judged)]
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
    device, precision = made_at.get("device", settings.device), made_at.get("precision", settings.precision)
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
        "dropped_estimated": totals["dropped_estimated"],
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
        "device": device,
        "precision": precision,
        "threads": settings.threads or None,
        "workers": max(len(workers), workers_flag or 1),
        "cost_per_hour": cost_per_hour,
        "cost_per_1000_docs": (cost_per_hour * wall_s / 3600 / docs * 1000) if cost_per_hour and docs else None,
        "hint": hint(shares, device, precision, bool(made_at.get("cpu_bf16"))),
        "timeline": [[round(m["committed_at"] - started_at, 3), m["embedded"]] for m in mine],
        "batch_latencies_s": [b[3] for b in batches],
        "quality": drift.run_quality(mine + late),
        "judged_runs": list(judged),
        "judged_units": len(late),
        "canaries": canary_summary(mine, settings.canary_threshold),
    }
    return report


def canary_summary(markers: list[dict], threshold: float | None) -> dict:
    """What the run's commits found of their workers' canaries: how many were compared, the lowest
    cosine and its canary, and whether this run pinned them."""
    checks = [m["canaries"] for m in markers if (m.get("canaries") or {}).get("checked")]
    if not checks:
        return {"checked": 0, "threshold": threshold}
    worst = min(checks, key=lambda c: c["min_cosine"])
    return {"checked": max(c["checked"] for c in checks), "min_cosine": worst["min_cosine"],
            "lowest": worst["lowest"], "pinned": any(c.get("pinned") for c in checks), "threshold": threshold,
            "workers": len({(m["worker"]["host"], m["worker"]["pid"]) for m in markers if m.get("worker")})}


def with_drift(report: dict, earlier: list[dict]) -> dict:
    """``report`` with its ``drift`` against the ``earlier`` runs' reports (oldest first): the last
    ``drift.BASELINE_RUNS`` runs with documents, less those flagged themselves, so one bad batch does
    not make the next good one look drifted; when all of them were flagged, all of them, so a lasting
    change becomes the new normal once it fills the window."""
    window = [r for r in earlier if r.get("quality", {}).get("docs")][-drift.BASELINE_RUNS:]
    usable = [r for r in window if not (r.get("drift") or {}).get("flagged")] or window
    report["drift"] = drift.compare(report["quality"], [r["quality"] for r in usable], [r["run_id"] for r in usable])
    return report


def history(output: OutputAdmin, before: str | None = None) -> list[dict]:
    """The runs' reports, oldest first; with ``before``, only those of runs started before that run.
    A report that cannot be read is left out, and statistics that are not well formed are dropped from
    theirs: reports inform, they are not the output's record."""
    found = []
    for name in output.report_names():
        if before is not None and record_key(name) >= before:
            continue
        try:
            report = output.read_report(name)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(report, dict) and report.get("run_id"):
            if not drift.well_formed(report.get("quality")):
                report.pop("quality", None)  # neither a baseline nor a point of the trend
            found.append(report)
    return found


def read(output_url: str, run_id: str | None = None) -> dict:
    output = OutputAdmin(output_url)
    names = output.report_names()
    if run_id:
        names = [n for n in names if record_key(n) == run_id]
    if not names:
        raise OutputError(f"{output_url} has no run report{' for ' + run_id if run_id else ''} under {REPORTS}/")
    return output.read_report(names[-1])  # run ids start with a timestamp: the last is the newest


def format_run_report(r: dict, counts: bool = True) -> str:
    """The report as text; ``counts=False`` leaves out what the run's own summary already says."""
    lat = r["batch_latency_ms"]
    stages = ", ".join(f"{k} {r['stage_s'][k]:.1f}s ({100 * r['stage_share'][k]:.0f}%)"
                       for k in (*STAGES, "other"))
    cost = (f"{r['cost_per_1000_docs']:.4f} per 1000 docs (at {r['cost_per_hour']}/hour)"
            if r.get("cost_per_1000_docs") is not None else "not computed (pass --cost-per-hour)")
    gpu = f", GPU peak {r['peak_gpu_mib']:.0f} MiB" if r.get("peak_gpu_mib") is not None else ""
    covered = coverage(r.get("long_docs", "truncate"), r["docs_embedded"], r["docs_truncated"],
                       r.get("windows", r["docs_embedded"]), r.get("text_tokens", 0), r.get("dropped_tokens", 0),
                       r.get("window", 0), r.get("dropped_estimated", False))
    head = [
        f"  counts     {plural(r['docs_embedded'], 'document')}, {plural(r.get('rows', r['docs_embedded']), 'row')} "
        f"written, {plural(r.get('windows', r['docs_embedded']), 'window')}, {plural(r['tokens'], 'token')} through "
        "the model",
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
        *(f"  {label:<10} {line}" for label, line in drift.format_quality(r.get("quality") or {})),
        *([f"  canaries   {format_canaries(r['canaries'])}"] if r.get("canaries") else []),
        *([f"  judged     {judged_line(r)}"] if r.get("judged_runs") else []),
        *([f"  drift      {drift.format_line(r['drift'])}"] if "drift" in r else []),
    ])


def judged_line(r: dict) -> str:
    runs = r["judged_runs"]
    return (f"the statistics and drift below include {plural(r.get('judged_units', 0), 'unit')} committed by "
            f"{agree(len(runs), 'run', 'runs')} {', '.join(runs)}, which ended without a report")


def format_canaries(c: dict) -> str:
    if not c.get("checked"):
        return "none compared (the model embedded no canary text)"
    checked = (f"{c['checked']} pinned by this run's first commit, and checked at every commit" if c.get("pinned")
               else f"{c['checked']} checked against the output's at every commit")
    workers = c.get("workers", 1)
    return (f"{checked} ({plural(workers, 'worker process', 'worker processes')}): lowest cosine {c['min_cosine']:.6f} "
            f"('{c['lowest']}'), threshold {c['threshold']}")


def draw_png(r: dict, path: str, history: list[dict] | None = None) -> None:
    """Throughput over the run, the batch-latency histogram and the stage breakdown; with ``history``
    (the output's reports, oldest first, up to this run's) of two runs or more, a second row with the
    trend over runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [h for h in (history or []) if (h.get("quality") or {}).get("docs")]
    runs = runs if len(runs) >= 2 else []  # a trend needs two runs
    fig, axes = plt.subplots(2 if runs else 1, 3, figsize=(15, 8.4 if runs else 4.2), squeeze=False)
    a, b, c = axes[0]
    times = [0.0] + [t for t, _ in r["timeline"]]
    docs = np.cumsum([0] + [n for _, n in r["timeline"]])
    a.plot(times, docs, marker="o", markersize=3)
    a.set(title=f"Documents embedded over the run ({r['docs_per_s']:.1f} docs/s)", xlabel="seconds since start",
          ylabel="documents committed")
    lat = np.array(r["batch_latencies_s"]) * 1000
    b.hist(lat, bins=min(40, max(5, len(lat) // 2)), color="tab:orange")
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        b.axvline(r["batch_latency_ms"][q], color="k", linestyle=style, label=f"{q} {r['batch_latency_ms'][q]:.0f} ms")
    b.set(title=f"Model latency per batch ({plural(r['batches'], 'batch', 'batches')})", xlabel="ms", ylabel="batches")
    b.legend(loc="upper center")
    names = [*STAGES, "other"]
    c.barh(names, [r["stage_s"][k] for k in names], color="tab:green")
    for i, k in enumerate(names):
        c.text(r["stage_s"][k], i, f" {100 * r['stage_share'][k]:.0f}%", va="center")
    c.set(title="Where the time went (worker-seconds)", xlabel="seconds")
    if runs:
        _draw_trend(axes[1], runs)
    fig.suptitle(f"docembed run {r['run_id']}: {plural(r['docs_embedded'], 'document')}, {r['device']} "
                 f"{r['precision']}; {r['hint'].split(':')[0]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_trend(axes, runs: list[dict]) -> None:
    """Per run: document lengths, the shares drift watches, and the mean-vector cosine to the runs
    before; runs whose drift was flagged are marked in red."""
    a, b, c = axes
    x = np.arange(len(runs))
    labels = [h["run_id"][:15] for h in runs]
    flagged = [i for i, h in enumerate(runs) if (h.get("drift") or {}).get("flagged")]
    for q, style in ((10, ":"), (50, "-"), (90, "--")):
        a.plot(x, [quality.percentile(h["quality"]["tokens"], q) for h in runs], style, marker="o", markersize=3,
               label=f"p{q}")
    a.set(title="Document length over runs", ylabel="tokens", yscale="log")
    a.legend()
    for name in ("truncated", "rejected", "mostly non-letters"):
        b.plot(x, [100 * drift.fraction(*drift.shares(h["quality"])[name]) for h in runs], marker="o", markersize=3,
               label=name)
    b.set(title="Shares of documents over runs", ylabel="%")
    b.legend()
    cosines = [next((s["value"] for s in (h.get("drift") or {}).get("signals", []) if s["name"] == "mean cosine"),
                    np.nan) for h in runs]
    c.plot(x, cosines, marker="o", markersize=3, color="tab:purple")
    c.set(title="Mean vector: cosine to the runs before", ylabel="cosine")
    for ax in axes:
        for i in flagged:
            ax.axvline(i, color="tab:red", alpha=0.3, linewidth=6)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    a.set_xlabel("run (red: drift flagged)")
