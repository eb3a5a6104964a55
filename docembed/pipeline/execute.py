"""Execute: submit a Beam graph, wait for it, and turn a failed job into one line naming its cause.

On local runners the job runs in this process; on a remote one Beam's own lines naming the submitted
job are shown and the job is handed to the stop handler, to cancel it if the launcher is interrupted.
A docembed error raised on a worker comes back as text; ``job_failed`` finds it there.
"""

from __future__ import annotations

import logging
import re
import sys

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter

from docembed.errors import DocembedError, JobFailed
from docembed.pipeline.graph import JobPlan, build_dedup_graph, build_graph
from docembed.pipeline.interrupt import StopOnSignal
from docembed.records import EmbedSettings
from docembed.transforms import metrics as metrics_mod
from docembed.transforms.dedup import find_here


# Beam's loggers that print a remote job's id, console URL and state changes.
SUBMISSION_LOGGERS = ("apache_beam.runners.dataflow.dataflow_runner", "apache_beam.runners.dataflow.internal.apiclient",
                      "apache_beam.runners.portability.portable_runner")


def find_duplicates(options, job, local: bool = True, stop: StopOnSignal | None = None) -> None:
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


def counters(result) -> dict:
    """docembed's Beam counters from a finished job; {} on runners that collect none (Dask): the run's
    manifest and report are built from the done-markers either way."""
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(metrics_mod.NAMESPACE))["counters"]
    except NotImplementedError:
        return {}
    return {c.key.metric.name: c.committed for c in found}


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
