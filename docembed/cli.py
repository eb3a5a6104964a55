"""CLI: the ``docembed`` command (and ``python -m docembed``), the front door. ``USAGE`` lists the
commands (run, status, verify, report, query, search, convert, --version) and the exit codes; ``docs/OPTIONS.md`` holds every
command's options, generated from the parsers here. docembed's own errors become one line,
``docembed: error: ...``, and the error's exit code: 0 done, 1 the job or a write failed, 2 a usage,
input or configuration error before any work, 3 drift flagged with --fail-on-drift, 75 another run
holds the output's lock, 143 interrupted (rerun to resume)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from docembed.errors import DocembedError
from docembed.store.storage import redact_text

USAGE = """usage: docembed run --input URL --output URL [options] [Beam flags]
       docembed run --job jobs/FILE.yaml [flags that override the file's] [--dry-run]
       docembed status --output URL [--json]
       docembed verify --output URL [--input URL] [--no-canaries] [--device D] [--precision P]
       docembed report --output URL [--run-id ID] [--png FILE] [--json]
       docembed query --output URL TEXT... | --file FILE [--json]
       docembed search --output URL TEXT... | --file FILE [-k 10] [--json]
       docembed convert --output SRC --to DST --output-dtype DTYPE [--truncate-dim N]
       docembed --version

run     embed Parquet documents into a Parquet dataset; rerun the same command to resume;
        --dry-run prints the plan, what is already done and whether a run holds the lock; runs nothing
status  units and documents done so far, read from the output's checkpoints, and whether a run is
        running (its lock is live), or was interrupted or failed
verify  check an output against its manifest (and its input: rows, and texts changed since they were
        embedded), and re-embed its canary texts here: exit 0 only when all holds; while a run is
        going, what it has committed so far
report  print a past run's report (throughput, latency percentiles, stages, cost); --png draws it
query   embed query texts exactly as the output's vectors were made (model, revision, prompt, window,
        dimensions, normalisation, dtype and calibration), on this machine, without Beam
search  the exact nearest neighbours of a text among the output's vectors, streaming its parts
convert write a float output again in another dtype (int8, uint8, binary, ubinary, float16) or fewer
        dimensions (--truncate-dim), without re-embedding; rerun the same command to resume

'docembed run --help' lists every option. Exit codes: 0 done, 1 the job failed or a write to the output
failed once the run began, 2 a usage, input or configuration error found before any work (an output
that cannot be written included), 3 drift flagged with --fail-on-drift (the run completed), 75 another
run holds the output's lock (try again later), 143 interrupted (rerun to resume)."""

# Commands that work with an output (query and search without Beam, in docembed.use; convert, a job
# with the output's lock, in docembed.pipeline): each function takes the argv and returns the exit code.
OUTPUT_COMMANDS = {"query": "docembed.use.query.query_command", "search": "docembed.use.search.search_command",
                   "convert": "docembed.pipeline.convert.convert_command"}

DRIFT_EXIT = 3  # --fail-on-drift: the run completed, and its input or vectors drifted from earlier runs'

# Flags that make `run` a dry run; Beam's own --dry_run=True means the same ("do not submit").
DRY_RUN = ("--dry-run", "--dry_run", "--dry_run=True", "--dry_run=true")


def console() -> None:
    """The ``docembed`` command: ``main``, then an immediate exit. Everything a run writes is committed
    (or deliberately left for the rerun) before ``main`` returns, so the seconds the interpreter would
    spend tearing down torch, transformers and Beam (1.3 s measured after a 10-document run) buy nothing."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Runs one command and returns its exit code.

    Args:
        argv: the command and its flags (``["run", "--input", "in/", "--output", "out/"]``); default
            ``sys.argv[1:]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from docembed import __version__

        print(f"docembed {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact)
        handler.addFilter(_drop_worker_start_notice)
        handler.addFilter(_drop_traceback_of_known_errors)
    try:
        if command == "run":
            return _run(rest)
        if command == "status":
            return _status(rest)
        if command == "verify":
            return _verify(rest)
        if command == "report":
            return _report(rest)
        if command in OUTPUT_COMMANDS:
            import importlib

            module, function = OUTPUT_COMMANDS[command].rsplit(".", 1)
            return getattr(importlib.import_module(module), function)(rest)
    except DocembedError as exc:
        print(f"docembed: error: {redact_text(error_line(exc))}", file=sys.stderr)
        return exc.exit_code
    print(f"docembed: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def error_line(exc: DocembedError) -> str:
    """The error's message, then what else went wrong as the run stopped (its notes: a manifest or a
    stop request that could not be written), on the same line: the first error stays the news."""
    return "; ".join([str(exc), *(" ".join(note.split()) for note in getattr(exc, "__notes__", []))])


def _redact(record: logging.LogRecord) -> bool:
    """No credential carried in a URL reaches the log (``storage.redact``), tracebacks included."""
    record.msg, record.args = redact_text(record.getMessage()), ()
    if record.exc_info and not record.exc_text:
        record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
    return True


def _drop_worker_start_notice(record: logging.LogRecord) -> bool:
    """Beam relays each local worker's start-up warning that it has no staging folder; docembed
    stages nothing there."""
    return "No semi_persistent_directory found" not in record.getMessage()


def _drop_traceback_of_known_errors(record: logging.LogRecord) -> bool:
    """Beam logs a failing DoFn's exception with its traceback; for docembed's own errors and failed
    reads and writes (an OSError: a full or read-only disk, a store's 5xx) the message says all, and
    the CLI says it as its last line: Beam's record of it is left out, so the user reads it once."""
    known = record.exc_info and isinstance(record.exc_info[1], (DocembedError, OSError))
    if known and record.name.startswith("apache_beam") and record.levelno >= logging.ERROR:
        return False
    if known:
        record.exc_info, record.exc_text = None, None
    return True


def _run(argv: list[str]) -> int:
    from docembed.pipeline.options import EmbedOptions
    from docembed.pipeline.progress import format_summary
    from docembed.pipeline.run import run

    if "-h" in argv or "--help" in argv:
        parser = argparse.ArgumentParser(prog="docembed run")
        EmbedOptions._add_argparse_args(parser)
        parser.add_argument("--dry-run", action="store_true",
                            help="print the plan (files, units, rows, text bytes), what is already done and to "
                                 "do, the pinned model and the requested device and precision; write and run nothing")
        parser.print_help()
        return 0
    from docembed.pipeline.jobs import expand_job
    from docembed.pipeline.admin.report import format_run_report

    argv = expand_job(argv)
    if any(a in DRY_RUN for a in argv):
        from docembed.pipeline.progress import format_dry_run
        from docembed.pipeline.run import dry_run

        print(redact_text(format_dry_run(dry_run([a for a in argv if a not in DRY_RUN]))))
        return 0
    summary = run(argv)
    print(redact_text(format_summary(summary)))
    if "report" in summary:
        print(redact_text(format_run_report(summary["report"], counts=False)))
        print(redact_text(f"  report     {summary['output'].rstrip('/')}/{summary['report_file']}"))
    if summary.get("fail_on_drift") and summary.get("report", {}).get("drift", {}).get("flagged"):
        print("docembed: drift flagged against earlier runs (--fail-on-drift); this run's units are committed",
              file=sys.stderr)
        return DRIFT_EXIT
    return 0


def _status(argv: list[str]) -> int:
    from docembed.pipeline.admin.status import format_status, status

    parser = argparse.ArgumentParser(prog="docembed status")
    parser.add_argument("--output", required=True)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    result = status(args.output)
    print(json.dumps(result, indent=1) if args.json else format_status(result))
    return 0


def _verify(argv: list[str]) -> int:
    from docembed.pipeline.admin.verify import format_verification, verify
    from docembed.model.canaries import THRESHOLD as CANARY_THRESHOLD

    parser = argparse.ArgumentParser(prog="docembed verify")
    parser.add_argument("--output", required=True)
    parser.add_argument("--input", default=None, help="also check every input row is embedded or rejected")
    parser.add_argument("--no-canaries", action="store_true",
                        help="skip re-embedding the canary texts (no model is loaded)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to re-embed the canaries (default: the output's device)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16", "int8"],
                        help="at what precision (default: the output's)")
    parser.add_argument("--canary-threshold", type=float, default=CANARY_THRESHOLD,
                        help=f"the lowest cosine to the pinned canary vectors that passes (default {CANARY_THRESHOLD})")
    args = parser.parse_args(argv)
    report = verify(args.output, args.input, not args.no_canaries, args.device, args.precision, args.canary_threshold)
    print(format_verification(args.output, report))
    return 0 if not report.problems else 1


def _report(argv: list[str]) -> int:
    from docembed.store.admin import OutputAdmin
    from docembed.pipeline.admin.report import draw_png, format_run_report, history, read

    parser = argparse.ArgumentParser(prog="docembed report")
    parser.add_argument("--output", required=True)
    parser.add_argument("--run-id", default=None, help="default: the newest run")
    parser.add_argument("--png", default=None, help="also draw throughput, latency and stages into this PNG")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    found = read(args.output, args.run_id)
    if args.json:
        print(json.dumps({k: v for k, v in found.items() if k != "batch_latencies_s"}, indent=1))
    else:
        print(f"docembed run {found['run_id']} into {found['output']}: {found['docs_embedded']} embedded, "
              f"{found['docs_rejected']} rejected, {found['docs_truncated']} truncated")
        print(format_run_report(found))
    if args.png:
        earlier = history(OutputAdmin(args.output), before=found["run_id"])
        draw_png(found, args.png, [*earlier, found])
        print(f"  picture    {args.png}")
    return 0
