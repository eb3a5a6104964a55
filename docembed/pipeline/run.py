"""Run: the lifecycle of one ``docembed run``: prepare (plan, settings) -> lock -> resume point and tidy
(``resume``) -> the jobs (``execute``) -> manifest, summary and report.

The launcher does only what must happen before the job and does not grow with the corpus's rows: it
reads the input's Parquet footers (not its rows), the model's configuration (not its weights) and the
output's bookkeeping; it writes the units to do to the output folder, submits a graph that names
them, and waits. Devices, precisions, weights and ids are the workers' business.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time

import apache_beam as beam

from docembed.errors import OutputError
from docembed.pipeline import execute
from docembed.pipeline import options as opts_mod
from docembed.pipeline.admin import manifest, report
from docembed.pipeline.graph import JobPlan
from docembed.pipeline.interrupt import StopOnSignal
from docembed.pipeline.lock import OutputLock, lock_state
from docembed.pipeline.options import EmbedOptions
from docembed.pipeline.plan import plan_input, split_done
from docembed.pipeline.progress import ProgressBar
from docembed.pipeline.resume import Resume, find_resume, retry_counts, retry_units, tidy
from docembed.pipeline.settings import resolve_settings
from docembed.records import EmbedSettings
from docembed.store.admin import OutputAdmin, marker_totals, snapshot, write_errors
from docembed.store.layout import REJECTS, unit_id_of_part


def run(argv: list[str], test_pipeline: beam.Pipeline | None = None) -> dict:
    """Embed the input into the output folder, resuming what an earlier run left; returns the summary.
    Once the output is found writable, a write of the launcher's that fails (the lock, the manifest,
    the plan, the stop request, the report, a removal) raises ``WriteFailed`` (exit 1) naming the file
    and the cause, and a run that stops short leaves a manifest saying how (``manifest.record_end``)."""
    started, started_at = time.monotonic(), time.time()
    options, opts, output, plan, settings = prepare(argv)
    check_writable(output)
    with write_errors(output.url), OutputLock(output, opts.lock_ttl, opts.wait_for_lock) as lock, \
            StopOnSignal(output, opts.grace_period) as stop, manifest.record_end(output, settings.run_id):
        if opts.overwrite:
            output.remove_all()
        settings = dataclasses.replace(settings, lock_token=lock.token)
        summary = _run_locked(options, opts, output, plan, settings, test_pipeline, stop)
        add_report(summary, output, started, started_at, _workers(options), opts.cost_per_hour)
        lock.check()  # its work is done, but another run may have taken the output over meanwhile
        summary["fail_on_drift"] = opts.fail_on_drift
    return summary


def add_report(summary: dict, output: OutputAdmin, started: float, started_at: float, workers: int,
               cost_per_hour: float | None) -> None:
    """The run's seconds (since the monotonic ``started``) into ``summary``, and, when it committed
    units or earlier runs' units are still unjudged (``report.unjudged``), its report, built from the
    done-markers and written under the output's reports."""
    summary["seconds"] = time.monotonic() - started
    run_id, markers, reports = summary["run_id"], output.done_markers(), report.history(output)
    late = report.unjudged(markers, reports, run_id)
    if summary["units_committed"] or late:
        built = report.build_report(run_id, markers, summary["seconds"], started_at, summary["settings"], workers,
                             cost_per_hour, late)
        summary["report"] = report.with_drift(built, [r for r in reports if r["run_id"] < run_id])
        summary["report_file"] = output.write_report(run_id, summary["report"])


def prepare(argv: list[str]):
    """(options, our options, the output, the plan, the settings): everything decided before the lock."""
    options = opts_mod.parse(argv)
    opts = options.view_as(EmbedOptions)
    columns = {"id": opts.id_column, "text": opts.text_column}
    columns.update({f"pass-through {c}": c for c in opts_mod.passthrough(opts)})
    plan = plan_input(opts.input, columns, opts.checkpoint_every, opts.skip_bad_files)
    settings = resolve_settings(opts, plan.passthrough_schema, opts_mod.threads_per_worker(options),
                                opts_mod.is_local_runner(options), plan.locations)
    return options, opts, OutputAdmin(opts.output), plan, settings


def dry_run(argv: list[str]) -> dict:
    """What a run would do, read without writing anything: the plan, what is already done, the
    settings, and the output's lock (``lock.lock_state``: a live one makes a run exit 75); the same
    checks as a run (fingerprint, numerics, unit boundaries) raise the same errors."""
    options, opts, output, plan, settings = prepare(argv)
    if opts.overwrite:  # the run would delete everything first
        resume = Resume(settings, {}, [], [], *split_done(plan, {}), plan=plan)
    else:
        resume = find_resume(output, plan, settings)
    todo, done = resume.todo, resume.done
    runner = options.get_all_options().get("runner") or "DirectRunner"
    plan = resume.plan
    return {"settings": resume.settings, "runner": runner, "lock": lock_state(output), "files": len(plan.files),
            "skipped_files": list(plan.skipped), "units": len(plan.units), "rows": plan.rows,
            "text_bytes": sum(u.text_bytes for u in plan.units),
            "units_done": len(done), "rows_done": sum(u.rows for u in done),
            "units_todo": len(todo), "rows_todo": sum(u.rows for u in todo),
            "text_bytes_todo": sum(u.text_bytes for u in todo), "superseded_units": len(resume.superseded),
            "repairs": resume.repairs()}


def _workers(options) -> int:
    all_options = options.get_all_options()
    return all_options.get("direct_num_workers") or 1 if opts_mod.is_local_runner(options) else 0


@dataclasses.dataclass
class Job:
    """A run's bookkeeping between ``before_job`` and ``after_job``: where it resumed from, its
    settings, its started manifest, the units it does and retries, and what its jobs read (None when
    there is nothing to do)."""

    resume: Resume
    settings: EmbedSettings
    record: dict
    retried: list
    before_retry: dict
    outside: list
    cleaned: list
    plan: JobPlan | None


def before_job(opts, output: OutputAdmin, plan, settings: EmbedSettings, in_graph: bool = False) -> Job:
    """With the lock held, before the jobs: refuse an output made otherwise, tidy it, start the
    manifest and write what the jobs read: the units to do and the output's files as they are now
    (``snapshot``), so that a task run again later sees the output as planned, not as this run
    has changed it. ``in_graph``: the runner gets the records in its graph too (``JobPlan``)."""
    resume = find_resume(output, plan, settings)
    plan, settings, markers, todo = resume.plan, resume.settings, resume.markers, resume.todo
    outside, cleaned = tidy(output, opts, plan, resume)
    removed = bool(resume.superseded) or any(g.get("pruned") for g in outside)
    retried = retry_units(markers, plan, opts.retry_rejects, repeats_too=removed)
    before_retry = {u.unit_id: markers[u.unit_id] for u in retried}
    record = manifest.started(settings, plan, opts.checkpoint_every)
    output.write_manifest(record)
    job_plan = None
    if todo or retried:
        units = todo + retried
        files = snapshot(markers, {u.unit_id for u in retried if "duplicate_id" in u.retry})
        job_plan = JobPlan(output.write_plan(settings.run_id, units), output.write_snapshot(settings.run_id, files),
                           (units, files), in_graph)
    return Job(resume, settings, record, retried, before_retry, outside, cleaned, job_plan)


def after_job(output: OutputAdmin, job: Job, beam_metrics: dict) -> dict:
    """After the graph ran: the manifest completed from the markers; returns the run's summary."""
    plan, markers = job.resume.plan, output.done_markers()
    output.write_manifest(manifest.completed(job.record, markers, plan, output.read_numerics(),
                                             output.read_quantization(), output.read_canaries()))
    resume, settings = job.resume, job.settings
    summary = summarize(settings, plan, markers, resume.todo, resume.done, 0.0)
    summary.update(retried=retry_counts(job.retried, job.before_retry, markers), superseded_units=len(resume.superseded),
                   repairs=resume.repairs(), outside_inputs=job.outside, run_id=settings.run_id, settings=settings,
                   cleaned=[c for c in job.cleaned if unit_id_of_part(c) or f"/{REJECTS}/" in c], metrics=beam_metrics)
    return summary


def _run_locked(options, opts, output: OutputAdmin, plan, settings, test_pipeline, stop: StopOnSignal) -> dict:
    job = before_job(opts, output, plan, settings, opts_mod.is_dask_runner(options))
    beam_metrics = {}
    if job.plan:
        units = {u.unit_id: (u.rows, u.text_bytes) for u in job.resume.plan.units}
        local = opts_mod.is_local_runner(options)
        execute.find_duplicates(options, job, local, stop)
        bar = ProgressBar(output, units, [u.unit_id for u in job.resume.done]) if opts.progress and local \
            else contextlib.nullcontext()
        with bar:
            result = execute.run_graph(test_pipeline or beam.Pipeline(options=options), job.plan, job.settings, local, stop)
        output.remove_plan()
        beam_metrics = execute.counters(result)
    stop.check()
    return after_job(output, job, beam_metrics)


def check_writable(output: OutputAdmin, flag: str = "--output") -> None:
    """Before the lock: a probe file written and removed, so that an output that cannot be written
    (read-only, full, no permission) is refused before any work, as a configuration error (exit 2);
    ``flag`` names it in the message."""
    try:
        output.check_writable()
    except OSError as exc:
        raise OutputError(f"cannot write to {flag} {output.url}: {' '.join(str(exc).split())}") from exc


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
                                    "text_tokens", "dropped_tokens", "dropped_estimated")},
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
