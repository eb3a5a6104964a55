"""Run: plan -> guard -> clean up -> Beam graph -> manifest and summary, for one ``docembed run``."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
import uuid

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter

from pipeline import manifest, options as opts_mod, report
from pipeline.graph import build_graph
from pipeline.guard import check_fingerprint
from pipeline.ids import mark_duplicates
from pipeline.interrupt import StopOnSignal
from pipeline.lock import OutputLock
from pipeline.options import EmbedOptions
from pipeline.plan import plan_input, split_done
from pipeline.progress import ProgressBar
from transforms import metrics as metrics_mod
from transforms.checkpoint import OutputFolder, marker_totals
from transforms.embed import acquire_embedder, load_embedder
from transforms.errors import DocembedError, JobFailed, OutputError, UsageError
from transforms.model import resolve_device, resolve_model, resolve_precision
from transforms.records import EmbedSettings

def run(argv: list[str], test_pipeline: beam.Pipeline | None = None) -> dict:
    """Embed the input into the output folder, resuming what an earlier run left; returns the summary."""
    started, started_at = time.monotonic(), time.time()
    options = opts_mod.parse(argv)
    opts = options.view_as(EmbedOptions)
    output = OutputFolder(opts.output)
    columns = {"id": opts.id_column, "text": opts.text_column}
    columns.update({f"pass-through {c}": c for c in opts_mod.passthrough(opts)})
    plan = plan_input(opts.input, columns, opts.checkpoint_every, opts.skip_bad_files)
    check_writable(output)
    with OutputLock(output, opts.lock_ttl, opts.wait_for_lock) as lock, \
            StopOnSignal(output, opts.grace_period) as stop:
        if opts.overwrite:
            output.remove_all()
        try:
            summary = _run_locked(options, opts, output, plan, test_pipeline, stop, lock.token)
        except OSError as exc:  # bookkeeping writes on the launcher: the store failed under us
            raise OutputError(f"writing to --output {output.url} failed: {exc}; rerun to resume") from exc
        summary["seconds"] = time.monotonic() - started
        if summary["units_committed"]:
            summary["report"] = report.build(summary["run_id"], output.done_markers(), summary["seconds"],
                                             started_at, summary["settings"], _workers(options), opts.cost_per_hour)
            summary["report_file"] = report.write(output, summary["report"])
    if lock.lost.is_set():
        raise OutputError(f"another run took over {output.url}'s lock during this run; check the output with "
                          "`python -m pipeline verify`")
    return summary


def _workers(options) -> int:
    all_options = options.get_all_options()
    return all_options.get("direct_num_workers") or 1 if opts_mod.is_local_runner(options) else 0


def _run_locked(options, opts, output: OutputFolder, plan, test_pipeline, stop: StopOnSignal, token: str) -> dict:
    settings, embedder = resolve_settings(opts, plan.passthrough_schema, opts_mod.threads_per_worker(options))
    settings = dataclasses.replace(settings, lock_token=token)
    check_fingerprint(output, settings)
    markers = output.done_markers()
    todo, done, superseded = split_done(plan, markers)
    for marker in superseded:  # a changed input file: its old rows go, its new units are to do
        output.remove_unit(marker)
        del markers[marker["unit_id"]]
    output.clean_leftovers(markers)  # before the id scan: unmarked parts must not count as "in the output"
    todo = mark_duplicates(plan, todo, output, opts.id_column, opts.on_duplicate_id, opts.skip_bad_files)
    record = manifest.started(settings, plan, opts.checkpoint_every)
    output.write_manifest(record)
    if todo:
        units = {u.unit_id: (u.rows, u.text_bytes) for u in plan.units}
        bar = (ProgressBar(output, units, [u.unit_id for u in done])
               if opts.progress and opts_mod.is_local_runner(options) else contextlib.nullcontext())
        with bar:
            result = run_graph(test_pipeline or beam.Pipeline(options=options), todo, settings)
        counters = result.metrics().query(MetricsFilter().with_namespace(metrics_mod.NAMESPACE))["counters"]
        beam_metrics = {c.key.metric.name: c.committed for c in counters}
    del embedder  # held until here so in-process workers reuse the driver's model
    stop.check()
    markers = output.done_markers()
    output.write_manifest(manifest.completed(record, markers, plan))
    summary = summarize(settings, plan, markers, todo, done, 0.0)
    summary.update(superseded_units=len(superseded), run_id=settings.run_id, settings=settings,
                   metrics=beam_metrics if todo else {})
    return summary


def run_graph(pipeline: beam.Pipeline, todo, settings: EmbedSettings):
    """Runs the graph to the end; returns the PipelineResult (its metrics: the docembed namespace)."""
    build_graph(pipeline, todo, settings)
    try:
        result = pipeline.run()
        result.wait_until_finish()
        return result
    except Exception as exc:  # Beam re-raises worker errors, sometimes wrapped: report the cause
        raise JobFailed(
            f"the job failed: {_cause(exc)}. Units committed so far are kept: fix the cause and "
            "rerun the same command to resume"
        ) from exc


def _cause(exc: BaseException) -> str:
    """Our own error's message where one is in the chain, else the innermost exception's."""
    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    ours = [e for e in chain if isinstance(e, DocembedError)]
    cause = ours[0] if ours else chain[-1]
    text = " ".join(str(cause).split())
    return (text if ours else f"{type(cause).__name__}: {text}")[:1000]


def check_writable(output: OutputFolder) -> None:
    probe = f"_probe-{uuid.uuid4().hex}"
    try:
        output.publish(probe, b"")
        output.fs.rm(output.path(probe))
    except OSError as exc:
        raise OutputError(f"cannot write to --output {output.url}: {exc}") from exc


def resolve_settings(opts: EmbedOptions, passthrough_schema=None, threads: int = 0):
    """EmbedSettings for this run, and the driver's loaded model (for its dimension, window, pooling)."""
    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    model_path, revision = resolve_model(opts.model, opts.model_revision)
    draft = EmbedSettings(
        output=opts.output, model=opts.model, model_path=model_path, model_revision=revision, dim=0,
        max_seq_length=opts.max_seq_length or 0, pooling="", normalize=opts.normalize,
        precision=precision, device=device, prefix=opts.prefix, id_column=opts.id_column,
        text_column=opts.text_column, passthrough_columns=opts_mod.passthrough(opts),
        min_batch_size=opts.min_batch_size, max_batch_size=opts.max_batch_size, max_batch_tokens=0,
        run_id=f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}",
        skip_bad_files=opts.skip_bad_files, passthrough_schema=passthrough_schema, threads=threads,
    )
    embedder = load_embedder(draft)
    budget = opts.max_batch_tokens or opts.min_batch_size * embedder.max_seq_length
    if budget < opts.min_batch_size * embedder.max_seq_length:
        raise UsageError(
            f"--max-batch-tokens {budget} is below --min-batch-size x window "
            f"({opts.min_batch_size} x {embedder.max_seq_length}); raise it or lower --min-batch-size"
        )
    settings = dataclasses.replace(
        draft, dim=embedder.dim, max_seq_length=embedder.max_seq_length, pooling=embedder.pooling(),
        normalize=embedder.normalize, max_batch_tokens=budget,
        **opts_mod.window_settings(opts, embedder.window_size),
    )
    return settings, acquire_embedder(settings, embedder)


def summarize(settings, plan, markers, todo, done, seconds) -> dict:
    ran = [markers[u.unit_id] for u in todo if u.unit_id in markers]
    planned = [markers[u.unit_id] for u in plan.units if u.unit_id in markers]
    reasons = collections.Counter()
    for marker in ran:
        reasons.update(marker.get("rejected_by_reason", {}))
    this_run, all_runs = marker_totals(ran), marker_totals(planned)
    return {
        "output": settings.output,
        "input_rows": plan.rows,
        **{k: this_run[k] for k in ("embedded", "rejected", "truncated", "rows", "windows", "tokens",
                                    "text_tokens", "dropped_tokens")},
        "rejected_by_reason": dict(sorted(reasons.items())),
        "long_docs": settings.long_docs,
        "processed": sum(m["row_end"] - m["row_start"] for m in ran),
        "skipped": sum(u.rows for u in done),
        "skipped_files": list(plan.skipped),
        "total_embedded": all_runs["embedded"],
        "total_rejected": all_runs["rejected"],
        "units_committed": len(ran),
        "units_skipped": len(done),
        "units_total": len(plan.units),
        "max_seq_length": settings.max_seq_length,
        "seconds": seconds,
    }
