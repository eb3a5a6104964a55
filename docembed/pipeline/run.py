"""Run: plan -> guard -> clean up -> Beam graph -> manifest and summary, for one ``docembed run``.

The launcher does only what must happen before the job and does not grow with the corpus's rows: it
reads the input's Parquet footers (not its rows), the model's configuration (not its weights) and the
output's bookkeeping; it writes the units to do to the output folder, submits a graph that names
them, and waits. Devices, precisions, weights and ids are the workers' business.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import re
import sys
import time
import uuid

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter

from docembed.pipeline.admin import manifest, repair, report

from docembed.pipeline import options as opts_mod
from docembed.pipeline.graph import JobPlan, build_dedup_graph, build_graph
from docembed.pipeline.guard import adopt_numerics, check_fingerprint
from docembed.pipeline.interrupt import StopOnSignal
from docembed.pipeline.lock import OutputLock, lock_state
from docembed.pipeline.options import EmbedOptions
from docembed.store.admin import OutputAdmin, marker_totals, snapshot, write_errors
from docembed.pipeline.pin import pin_model
from docembed.pipeline.plan import Plan, align, outside_plan, plan_input, split_done
from docembed.pipeline.progress import ProgressBar
from docembed.transforms import metrics as metrics_mod
from docembed.store.units import REJECTS, unit_id_of_part
from docembed.transforms.dedup import find_here
from docembed.errors import DocembedError, JobFailed, OutputError, UsageError
from docembed.model.embedder import describe, prompts
from docembed.model.numerics import check_here, check_request
from docembed.records import EmbedSettings, WorkUnit

# Beam's loggers that print a remote job's id, console URL and state changes.
SUBMISSION_LOGGERS = ("apache_beam.runners.dataflow.dataflow_runner", "apache_beam.runners.dataflow.internal.apiclient",
                      "apache_beam.runners.portability.portable_runner")


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
        built = report.build(run_id, markers, summary["seconds"], started_at, summary["settings"], workers,
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
        resume = guard(output, plan, settings)
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
class Resume:
    """Where a run starts from: its settings (the output's numerics adopted), the markers of units
    really done, the damaged units to redo, what is wrong with the manifest (if anything), and the
    plan's units to do, done, and superseded (their input file changed); where ``_canaries.json`` is
    damaged, the manifest's copy to restore; the plan, its files cut as the output holds them."""

    settings: EmbedSettings
    markers: dict
    damage: list
    manifest_damage: list
    todo: list
    done: list
    superseded: list
    canaries_copy: dict | None = None
    plan: Plan | None = None  # the run's plan as the output holds its files (``plan.align``)

    def repairs(self) -> list[str]:
        return self.manifest_damage + [d.describe() for d in self.damage]


def guard(output: OutputAdmin, plan, settings: EmbedSettings) -> Resume:
    """After refusing an output made with other settings or numerics, or with other unit boundaries:
    where the run starts from. Damaged bookkeeping is found here (``repair``), not yet mended."""
    manifest, wrong = output.load_manifest()
    check_fingerprint(output, settings, manifest)
    settings = adopt_numerics(output, settings, manifest)
    manifest_damage = [f"{wrong}: this run rewrites it"] if wrong else []
    canaries_damage = repair.canaries_damage(output, manifest)
    manifest_damage += [canaries_damage] if canaries_damage else []
    markers, damage = repair.find(output)
    plan = align(plan, markers, ((manifest or {}).get("settings") or {}).get("checkpoint_every"))
    return Resume(settings, markers, damage, manifest_damage, *split_done(plan, markers),
                  canaries_copy=manifest["canaries"] if canaries_damage else None, plan=plan)


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
    resume = guard(output, plan, settings)
    plan, settings, markers, todo = resume.plan, resume.settings, resume.markers, resume.todo
    outside, cleaned = _tidy(output, opts, plan, resume)
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
        find_duplicates(options, job, local, stop)
        bar = ProgressBar(output, units, [u.unit_id for u in job.resume.done]) if opts.progress and local \
            else contextlib.nullcontext()
        with bar:
            result = run_graph(test_pipeline or beam.Pipeline(options=options), job.plan, job.settings, local, stop)
        output.remove_plan()
        beam_metrics = counters(result)
    stop.check()
    return after_job(output, job, beam_metrics)


def find_duplicates(options, job: Job, local: bool = True, stop: StopOnSignal | None = None) -> None:
    """The duplicate-id check (``docembed.transforms.dedup``), to the end before the embedding job starts: a
    job of its own on a cluster, in this process on local runners (``dedup.find_here``)."""
    if not local:
        run_graph(beam.Pipeline(options=options), job.plan, job.settings, local, stop, build=build_dedup_graph,
                  what="duplicate-id job")
        return
    try:
        find_here(*job.plan.records, job.settings)
    except (DocembedError, OSError) as exc:  # as the job would fail on a worker
        raise job_failed(exc) from exc


def counters(result) -> dict:
    """docembed's Beam counters from a finished job; {} on runners that collect none (Dask): the run's
    manifest and report are built from the done-markers either way."""
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(metrics_mod.NAMESPACE))["counters"]
    except NotImplementedError:
        return {}
    return {c.key.metric.name: c.committed for c in found}


def _tidy(output: OutputAdmin, opts, plan, resume: Resume) -> tuple[list[dict], list[str]]:
    """Before the job: take back damaged units and those of changed input files, restore damaged pinned
    canaries from the manifest's copy, prune gone files' units when asked, and remove what no marker
    names. Returns (units of files outside the plan, what
    was removed). ``resume.markers`` is kept up to date."""
    markers = resume.markers
    repair.take_back(output, resume.damage)
    if resume.canaries_copy:  # restored before this run's manifest replaces the copy
        repair.restore_canaries(output, resume.canaries_copy)
    for marker in resume.superseded:  # a changed input file: its old rows go, its new units are to do
        output.remove_unit(marker)
        del markers[marker["unit_id"]]
    outside = outside_plan(markers, plan.sources)
    if opts.prune_removed:
        prune(output, markers, outside)
    return outside, output.clean_leftovers(markers)  # before the id check: unmarked parts are not "in the output"


def retry_units(markers: dict, plan, reasons: str, repeats_too: bool = False) -> list[WorkUnit]:
    """``--retry-rejects``: the done units of this plan holding rejections for these reasons, as units
    whose rejections the job tries again. ``repeats_too``: this run took units back (a changed or a
    pruned file), which may have held the first occurrence of an id rejected elsewhere as
    ``duplicate_id``; those rejections are judged again, so that such a row is embedded, not lost."""
    wanted = tuple(r.strip() for r in (reasons or "").split(",") if r.strip())
    wanted += ("duplicate_id",) if repeats_too and "duplicate_id" not in wanted else ()
    planned = {u.unit_id for u in plan.units}
    return [dataclasses.replace(WorkUnit.from_json(m), retry=wanted, retry_rejects=m.get("rejects") or "")
            for uid, m in sorted(markers.items())
            if wanted and uid in planned and set(m.get("rejected_by_reason", {})) & set(wanted)]


def retry_counts(retried: list[WorkUnit], before: dict, after: dict) -> dict:
    """Rows a retry of rejections tried, and embedded, from the units' markers before and after."""
    if not retried:
        return {}
    reasons = set(retried[0].retry)

    def standing(markers):
        return sum(n for u in retried for r, n in markers[u.unit_id].get("rejected_by_reason", {}).items()
                   if r in reasons)

    tried = standing(before)
    return {"units": len(retried), "reasons": sorted(reasons), "tried": tried, "embedded": tried - standing(after)}


def prune(output: OutputAdmin, markers: dict, outside: list[dict]) -> None:
    """``--prune-removed``: take back the units of input files that are gone, marker first, as a
    changed file's are. Refused when it would take back every unit: a mistyped --input must not
    erase an output."""
    gone = [g for g in outside if g["gone"]]
    if gone and sum(g["units"] for g in gone) == len(markers):
        raise UsageError(f"--prune-removed would delete every unit of {output.url} (none of its input files is "
                         "there any more): check --input, or use --overwrite to start afresh")
    for group in gone:
        for unit_id in group["unit_ids"]:
            output.remove_unit(markers.pop(unit_id))
        group["pruned"] = True


def run_graph(pipeline: beam.Pipeline, plan: JobPlan, settings: EmbedSettings, local: bool = True,
              stop: StopOnSignal | None = None, build=build_graph, what: str = "job"):
    """Runs the graph ``build`` adds (the embedding job's by default) to the end; returns the
    PipelineResult (its metrics: the docembed namespace).
    On a remote runner, Beam's own lines naming the submitted job (its id, console URL, state
    changes) are shown, and the job id is printed as soon as it is known; ``stop`` gets the job, to
    cancel it if the launcher is interrupted."""
    build(pipeline, plan, settings)
    if not local:
        for name in SUBMISSION_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        result = pipeline.run()
        if stop is not None:
            stop.job = None if local else result
        if not local:
            print(f"docembed: submitted {what}{_job_id(result)} to {type(pipeline.runner).__name__}; waiting for it "
                  "(Ctrl-C stops taking new units; the job's committed units are kept)", file=sys.stderr, flush=True)
        result.wait_until_finish()
        return result
    except Exception as exc:  # Beam re-raises worker errors, sometimes wrapped: report the cause
        if stop is not None:
            stop.check()  # the workers failed because a signal stopped them: that is the news
        raise job_failed(exc) from exc


def job_failed(exc: BaseException) -> JobFailed:
    """Exit 1, naming the cause of a job's failure (``_cause``)."""
    return JobFailed(f"the job failed: {_cause(exc)}. Units committed so far are kept: fix the cause and rerun "
                     "the same command to resume")


def _job_id(result) -> str:
    """" ID" of a submitted job, "" where the runner gives none (Dask)."""
    job_id = getattr(result, "job_id", None)  # Dataflow's result has job_id(); the portable one, _job_id
    job_id = job_id() if callable(job_id) else getattr(result, "_job_id", None)
    return f" {job_id}" if job_id else ""


# How a docembed error raised on a remote worker reads in the text the runner sends back.
_REMOTE_ERROR = re.compile(r"docembed\.errors\.(\w+): ([^\n]+)")


def _cause(exc: BaseException) -> str:
    """Our own error's message where one is in the chain (in-process workers) or in the text a remote
    runner sent back, else the innermost exception's."""
    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    ours = [e for e in chain if isinstance(e, DocembedError)]
    remote = _REMOTE_ERROR.findall(str(exc)) if not ours else []
    if remote:
        return " ".join(remote[-1][1].split())[:1000]
    cause = ours[0] if ours else chain[-1]
    text = " ".join(str(cause).split())
    return (text if ours else f"{type(cause).__name__}: {text}")[:1000]


def check_writable(output: OutputAdmin) -> None:
    """Before the lock: a probe file written and removed, so that an output that cannot be written
    (read-only, full, no permission) is refused before any work, as a configuration error (exit 2)."""
    try:
        output.check_writable()
    except OSError as exc:
        raise OutputError(f"cannot write to --output {output.url}: {' '.join(str(exc).split())}") from exc


def resolve_settings(opts: EmbedOptions, passthrough_schema=None, threads: int = 0,
                     local_runner: bool = True, locations: dict | None = None) -> EmbedSettings:
    """EmbedSettings for this run: the model pinned to a reference every worker resolves, and
    described from its configuration files (dimension, window, pooling) without loading its weights.
    Device and precision stay as asked; each worker resolves them on its own hardware."""
    check_request(opts.device, opts.precision)
    if local_runner:
        check_here(opts.device, opts.precision)
    ref, folder = pin_model(opts.model, opts.model_revision, local_runner)
    prefix = prompt_text(folder, opts.prompt_name) if opts.prompt_name else opts.prefix
    card = describe(folder, opts.max_seq_length, prefix, opts.truncate_dim)
    budget = batch_budget(opts.max_batch_tokens, opts.min_batch_size, card.max_seq_length)
    return EmbedSettings(
        output=opts.output, model_ref=ref, dim=card.dim, max_seq_length=card.max_seq_length, pooling=card.pooling,
        normalize=card.has_normalize if opts.normalize is None else opts.normalize,
        precision=opts.precision, device=opts.device, prefix=prefix, id_column=opts.id_column,
        text_column=opts.text_column, passthrough_columns=opts_mod.passthrough(opts),
        min_batch_size=opts.min_batch_size, max_batch_size=opts.max_batch_size, max_batch_tokens=budget,
        run_id=f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}",
        skip_bad_files=opts.skip_bad_files, on_duplicate_id=opts.on_duplicate_id, locations=locations,
        max_model_errors=opts.max_model_errors,
        passthrough_schema=passthrough_schema, threads=threads,
        truncate_dim=opts.truncate_dim, trust_remote_code=opts.trust_remote_code, output_dtype=opts.output_dtype,
        canary_threshold=opts.canary_threshold,
        **opts_mod.window_settings(opts, card.window_size),
    )


def batch_budget(max_batch_tokens: int | None, min_batch_size: int, window: int) -> int:
    """Padded tokens per batch: as asked, else enough for ``min_batch_size`` full windows; a budget
    that cannot hold them is refused."""
    budget = max_batch_tokens or min_batch_size * window
    if budget < min_batch_size * window:
        raise UsageError(f"--max-batch-tokens {budget} is below --min-batch-size x window "
                         f"({min_batch_size} x {window}); raise it or lower --min-batch-size")
    return budget


def prompt_text(folder, name: str) -> str:
    """The text of the model's own prompt ``name`` (``--prompt-name``); a name it lacks is refused,
    with the names it has."""
    known = prompts(folder)
    if name not in known:
        raise UsageError(f"--prompt-name {name}: the model has no such prompt (its prompts: "
                         f"{', '.join(sorted(known)) or 'none'})")
    return known[name]


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
