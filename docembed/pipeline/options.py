"""Options: the one PipelineOptions subclass for docembed's flags, and our own validation of it.

Beam's own flags (``--runner``, ``--direct_num_workers``, ``--project``, ...) parse alongside these.
Beam neither validates subclass options nor rejects unknown flags, so ``parse`` does both. Every
docembed flag takes its underscore spelling too (``--checkpoint_every``, as Beam's own flags are
written): argparse would otherwise leave it to Beam, which drops it with a warning.
"""

from __future__ import annotations

import argparse
import difflib
import re

from apache_beam.options.pipeline_options import PipelineOptions

from docembed.model.canaries import THRESHOLD as CANARY_THRESHOLD
from docembed.errors import UsageError
from docembed.model.ref import DEFAULT_MODEL
from docembed.vectors import OUTPUT_DTYPES


class EmbedOptions(PipelineOptions):
    """docembed's flags. No ``required=True`` here: it would break every PipelineOptions in the process."""

    @classmethod
    def _add_argparse_args(cls, parser):
        def add(name, **kwargs):
            twin = "--" + name[2:].replace("-", "_")
            parser.add_argument(*dict.fromkeys([name, twin]), **kwargs)

        add("--input", help="Parquet file, folder or glob; any fsspec URL (local, gs://, s3://, memory://)")
        add("--output", help="output folder URL; becomes a Parquet dataset")
        add("--id-column", default="id", help="column holding each document's id (default: id)")
        add("--text-column", default="text", help="column holding the text to embed (default: text)")
        add("--passthrough-columns", default="", help="comma-separated input columns copied to the output")
        add("--model", default=DEFAULT_MODEL,
            help="a sentence-transformers model: a hub id, an object-store folder (s3://, gs://) or, on local "
                 "runners, a local folder; default: the packaged all-MiniLM-L6-v2")
        add("--model-revision", default=None,
            help="hub models: the branch, tag or commit to pin (the launcher pins it to a commit)")
        add("--max-seq-length", type=int, default=None, help="token window; default: the model's own")
        add("--normalize", action=argparse.BooleanOptionalAction, default=None,
            help="L2-normalise vectors; default: as the model's own config says")
        add("--prefix", default="", help="text put before every document, e.g. 'passage: ' for e5 models")
        add("--prompt-name", default=None,
            help="one of the model's own prompts (its sentence-transformers config), put before every document")
        add("--truncate-dim", type=int, default=None,
            help="keep the first N dimensions (Matryoshka models), re-normalised when the vectors are")
        add("--output-dtype", choices=OUTPUT_DTYPES, default="float32",
            help="how vectors are stored: float32 (default), float16, int8 or uint8 (256 buckets per dimension, "
                 "calibrated on the first unit), binary or ubinary (one bit per dimension)")
        add("--trust-remote-code", action="store_true", default=False,
            help="let the model's folder run its own Python code (models such as nomic or jina need it)")
        add("--min-batch-size", type=int, default=64, help="documents per batch, at least (default 64)")
        add("--max-batch-size", type=int, default=256, help="documents per batch, at most (default 256)")
        add("--max-batch-tokens", type=int, default=None,
            help="padded tokens per batch, at most; default: min-batch-size x window")
        add("--long-docs", default="truncate", choices=["truncate", "mean", "chunks"],
            help="documents longer than the model's window: embed the first window only (truncate, default), "
                 "one vector per document from all its windows (mean), or one row per window (chunks)")
        add("--chunk-overlap", type=int, default=None,
            help="mean and chunks: tokens each window shares with the one before (default 32)")
        add("--chunk-boundary", default=None, choices=["token", "sentence"],
            help="mean and chunks: cut windows at any token (default), or end each at the last paragraph "
                 "or sentence end within its last --boundary-lookback tokens where there is one")
        add("--boundary-lookback", type=int, default=None,
            help="with --chunk-boundary sentence: how many tokens a window may give up to end at a "
                 "sentence or paragraph end (default 64)")
        add("--count-dropped", default=None, choices=["exact", "estimate"],
            help="truncate: how the tokens cut off past the window are counted for the run's report: by "
                 "tokenizing the rest of each long text (exact, default), or from its characters at the rate "
                 "of the text's own first window (estimate: a GPU's host then tokenizes only what the model "
                 "sees; totals within a few percent); the vectors are the same either way")
        add("--chunk-text", action="store_true", help="chunks: store each window's text in a chunk_text column")
        add("--checkpoint-every", type=int, default=10000,
            help="rows per work unit; a unit is committed and checkpointed as a whole (default 10000)")
        add("--threads", type=int, default=0,
            help="CPU threads per worker process for the model; 0 (default): cores / local worker "
                 "processes on the DirectRunner, the library default elsewhere")
        add("--device", default="auto", choices=["auto", "cpu", "cuda"],
            help="resolved by each worker on its own hardware: auto (the output's device if it holds vectors, "
                 "else CUDA where the worker has it), cpu, or cuda (a worker without CUDA fails the job)")
        add("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16", "int8"],
            help="auto: the output's precision if it holds vectors, else fp16 on CUDA and fp32 on the CPU; "
                 "bf16 needs CUDA or a CPU with native bf16, int8 a CPU with VNNI (checked on each worker)")
        add("--on-duplicate-id", default="error", choices=["error", "keep-first"],
            help="a repeated id (within the input, or already in the output): fail before any embedding, "
                 "naming examples (error, exit 1), or embed the first occurrence and reject the others as "
                 "duplicate_id (keep-first)")
        add("--max-model-errors", type=float, default=0.01,
            help="the share of a unit's documents the model may fail on alone (rejected as model_error) before "
                 "the unit fails instead, uncommitted, for a rerun to retry (default 0.01; at least one "
                 "document is always allowed)")
        add("--retry-rejects", default="",
            help="comma-separated rejection reasons (model_error, unreadable_file, duplicate_id) whose rows in done units "
                 "are embedded again, after their cause was fixed; they move from _rejects/ into the output")
        add("--skip-bad-files", action="store_true",
            help="leave out files that are not readable Parquet (recorded in the manifest and summary) "
                 "instead of failing")
        add("--overwrite", action="store_true", help="delete the output folder and start afresh")
        add("--prune-removed", action="store_true",
            help="delete the parts and markers of input files that are gone since they were embedded (without "
                 "it they stay, and the run names them); refused when it would delete every unit")
        add("--wait-for-lock", type=float, default=0.0,
            help="seconds to wait for another run's lock on the output folder (default: fail at once)")
        add("--lock-ttl", type=float, default=60.0,
            help="seconds after which a lock whose heartbeat stopped (a run killed on another machine) is "
                 "taken over; a lock of a dead process on this machine is taken over at once (default 60)")
        add("--grace-period", type=float, default=60.0,
            help="on SIGTERM, seconds to let the unit in hand finish before abandoning it (default 60)")
        add("--canary-threshold", type=float, default=CANARY_THRESHOLD,
            help="a worker whose vectors of docembed's canary texts have a cosine below this to the output's "
                 "(pinned by its first commit) refuses to commit, and the job fails (default 0.999; -1: compared and "
                 "recorded, never refused)")
        add("--fail-on-drift", action="store_true",
            help="exit 3 when this run's input or vectors drifted from the earlier runs' into the output, past "
                 "the documented thresholds (the run's units are committed either way); for cron")
        add("--cost-per-hour", type=float, default=None,
            help="what the machines of this run cost per hour, for the report's cost per 1000 documents")
        add("--progress", action=argparse.BooleanOptionalAction, default=True,
            help="show a progress bar (local runners)")
        add("--verbose", action="store_true",
            help="let workers print Beam's INFO lines too (by default they print warnings and errors only)")


# Worker processes print warnings and errors, not Beam's INFO lines, nor its warning that a worker
# discarded the docembed flags it has no parser for (every flag, on every worker): unless --verbose,
# or the user sets these Beam flags.
QUIET_WORKERS = ["--default_sdk_harness_log_level=WARNING",
                 '--sdk_harness_log_level_overrides={"apache_beam.options.pipeline_options": "ERROR"}']


SUGGEST_CUTOFF = 0.6  # difflib's similarity a known flag needs to be offered for a misspelt one


def parse(argv: list[str], paths: bool = True) -> PipelineOptions:
    """PipelineOptions for ``argv``; raises UsageError naming every problem found. ``paths=False``:
    no --input and --output are needed (a transform that embeds its pipeline's own elements)."""
    own = [flag.split("=")[0] for flag in QUIET_WORKERS]
    if "--verbose" not in argv and not any(a.split("=")[0] in own for a in argv):
        argv = [*argv, *QUIET_WORKERS]
    argv = dask_flags(argv)
    options = PipelineOptions(argv)
    unknown, known = unknown_flags(options, argv)
    problems = [f"unknown flag {flag}" + (f" (did you mean {match}?)" if (match := suggest_flag(flag, known)) else "")
                for flag in unknown]
    problems += validate(options.view_as(EmbedOptions), paths)
    if problems:
        raise UsageError("; ".join(problems))
    return options


def unknown_flags(options: PipelineOptions, argv: list[str]) -> tuple[list[str], list[str]]:
    """(the flags of ``argv`` that no PipelineOptions class of this process defines, as the user spelt
    them; every flag one does). Beam's own parser decides, holding every class's flags, as when Beam
    parses them; asked this way, Beam does not also warn that it discards the unknown ones."""
    found: dict[str, list[str]] = {}

    def inspect(parser: argparse.ArgumentParser) -> None:
        found["known"] = [flag for action in parser._actions for flag in action.option_strings]
        found["unknown"] = parser.parse_known_args(argv)[1]

    options.get_all_options(retain_unknown_options=True, add_extra_args_fn=inspect)
    unknown = []
    for arg in found["unknown"]:
        if arg == "--":  # the end of the flags
            break
        if arg.startswith("-") and not _NUMBER.fullmatch(arg):  # else a value
            unknown.append(arg.split("=", 1)[0])
    return list(dict.fromkeys(unknown)), found["known"]


_NUMBER = re.compile(r"-\d+(\.\d*)?(e-?\d+)?")


def suggest_flag(flag: str, known: list[str]) -> str | None:
    """The ``known`` flag closest to a misspelt ``flag`` (difflib), or None. docembed's flags take both
    spellings: the one in the user's style, underscores if ``flag`` has any, else hyphens; Beam's
    flags as Beam spells them (``--direct-num-workers``: ``--direct_num_workers``)."""
    spellings: dict[str, list[str]] = {}
    for name in known:
        spellings.setdefault(name.lstrip("-").replace("-", "_"), []).append(name)
    match = difflib.get_close_matches(flag.lstrip("-").replace("-", "_"), list(spellings), n=1, cutoff=SUGGEST_CUTOFF)
    if not match:
        return None
    candidates = spellings[match[0]]
    return next((c for c in candidates if ("_" in c) == ("_" in flag)), candidates[0])


def validate(opts: EmbedOptions, paths: bool = True) -> list[str]:
    problems = []
    if paths and not opts.input:
        problems.append("--input is required")
    if paths and not opts.output:
        problems.append("--output is required")
    if not 1 <= opts.min_batch_size <= opts.max_batch_size:
        problems.append(
            f"--min-batch-size {opts.min_batch_size} must be >= 1 and <= --max-batch-size {opts.max_batch_size}"
        )
    if opts.checkpoint_every < 1:
        problems.append(f"--checkpoint-every must be >= 1, got {opts.checkpoint_every}")
    if opts.cost_per_hour is not None and opts.cost_per_hour < 0:
        problems.append(f"--cost-per-hour must be >= 0, got {opts.cost_per_hour}")
    retry = {r.strip() for r in (opts.retry_rejects or "").split(",") if r.strip()}
    if retry - RETRYABLE:
        problems.append(f"--retry-rejects {', '.join(sorted(retry - RETRYABLE))}: only {', '.join(sorted(RETRYABLE))} "
                        "can turn out otherwise on another try; the other reasons are the input's")
    if not 0 <= opts.max_model_errors <= 1:
        problems.append(f"--max-model-errors is a share of a unit's documents, 0 to 1; got {opts.max_model_errors}")
    if opts.lock_ttl <= 0:
        problems.append(f"--lock-ttl must be > 0 seconds, got {opts.lock_ttl}")
    problems += _long_docs_problems(opts)
    own = {"id", "embedding", "_row"} | ({"chunk", "char_start", "char_end", "chunk_text"}
                                          if opts.long_docs == "chunks" else set())
    clashes = sorted(own & set(passthrough(opts)) - {opts.id_column})
    if clashes or ("id" in passthrough(opts) and opts.id_column != "id"):
        problems.append(f"--passthrough-columns {', '.join(clashes or ['id'])}: these names are the output's own "
                        f"columns ({', '.join(sorted(own - {'_row'}))}); rename the input column")
    if opts.threads < 0:
        problems.append(f"--threads must be >= 0, got {opts.threads}")
    if opts.max_seq_length is not None and opts.max_seq_length < 2:
        problems.append(f"--max-seq-length must be >= 2, got {opts.max_seq_length}")
    if opts.prompt_name and opts.prefix:
        problems.append("--prefix and --prompt-name both give the text before each document: pass one")
    if not -1 <= opts.canary_threshold <= 1:
        problems.append(f"--canary-threshold is a cosine, -1 to 1; got {opts.canary_threshold}")
    if opts.truncate_dim is not None and opts.truncate_dim < 1:
        problems.append(f"--truncate-dim must be >= 1, got {opts.truncate_dim}")
    return problems


CHUNK_OVERLAP, BOUNDARY_LOOKBACK = 32, 64
# Rejection reasons another try can change (a fixed device, a file readable again, a repeated id whose
# first occurrence the output no longer holds); the others (empty text, invalid UTF-8, a null id) are
# the input's and would come out the same.
RETRYABLE = {"model_error", "unreadable_file", "duplicate_id"}


def _long_docs_problems(opts: EmbedOptions) -> list[str]:
    """Window flags only mean something when documents are cut into windows: given with
    ``truncate`` they would be silently ignored, so they are refused instead."""
    given = [f"--{name.replace('_', '-')}" for name in ("chunk_overlap", "chunk_boundary", "boundary_lookback")
             if getattr(opts, name) is not None]
    if opts.long_docs == "truncate" and given:
        return [f"{', '.join(given)} apply to --long-docs mean or chunks, not truncate"]
    problems = []
    if opts.count_dropped is not None and opts.long_docs != "truncate":
        problems.append("--count-dropped applies to --long-docs truncate only: mean and chunks embed every token")
    if opts.chunk_text and opts.long_docs != "chunks":
        problems.append("--chunk-text applies to --long-docs chunks only")
    if (opts.chunk_overlap or 0) < 0:
        problems.append(f"--chunk-overlap must be >= 0, got {opts.chunk_overlap}")
    if (opts.boundary_lookback or 0) < 0:
        problems.append(f"--boundary-lookback must be >= 0, got {opts.boundary_lookback}")
    if opts.boundary_lookback is not None and opts.chunk_boundary != "sentence":
        problems.append("--boundary-lookback applies to --chunk-boundary sentence only")
    return problems


def window_settings(opts: EmbedOptions, window_size: int) -> dict:
    """The window fields of EmbedSettings (under truncate, how the tokens past it are counted), defaults
    filled in, checked against the model's window
    (``window_size``: content tokens per window). Raises UsageError when windows could not advance."""
    if opts.long_docs == "truncate":
        return {"long_docs": "truncate", "count_dropped": opts.count_dropped or "exact"}
    overlap = CHUNK_OVERLAP if opts.chunk_overlap is None else opts.chunk_overlap
    boundary = opts.chunk_boundary or "token"
    lookback = (BOUNDARY_LOOKBACK if opts.boundary_lookback is None else opts.boundary_lookback) \
        if boundary == "sentence" else 0
    if overlap + lookback >= window_size:
        raise UsageError(f"--chunk-overlap {overlap}" + (f" + --boundary-lookback {lookback}" if lookback else "")
                         + f" must be below the {window_size} tokens a window holds for text")
    return {"long_docs": opts.long_docs, "chunk_overlap": overlap, "chunk_boundary": boundary,
            "boundary_lookback": lookback, "chunk_text": bool(opts.chunk_text)}


def passthrough(opts: EmbedOptions) -> tuple[str, ...]:
    return tuple(c.strip() for c in (opts.passthrough_columns or "").split(",") if c.strip())


DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


def dask_flags(argv: list[str]) -> list[str]:
    """``argv`` for Beam, where it asks for the DaskRunner: its short name resolved to Beam's full path
    (Beam resolves only the runners it lists), its flags registered (Beam's DaskOptions exist once
    its module is imported), and one work unit per Dask partition unless the flags choose otherwise
    (Beam's DaskRunner partitions only what ``Create`` holds; ``docembed.pipeline.graph``)."""
    runner = [k for k, a in enumerate(argv) if a.split("=")[0] == "--runner"]
    value = (argv[runner[-1]].partition("=")[2] or (argv[runner[-1] + 1] if runner[-1] + 1 < len(argv) else "")
             ) if runner else ""
    if value.split(".")[-1] != "DaskRunner":
        given = sorted({a.split("=")[0] for a in argv if a.startswith("--dask_")})
        if given:  # Beam knows them only once a Dask run imported its runner: refuse them alike either way
            raise UsageError(f"{', '.join(given)} apply to --runner DaskRunner only")
        return argv
    try:
        import apache_beam.runners.dask.dask_runner  # noqa: F401 - registers --dask_client_address and the rest
    except ImportError as exc:
        raise UsageError(f"--runner DaskRunner needs dask and distributed ({exc}): pip install 'docembed[dask]'") from exc
    argv = [a for k, a in enumerate(argv) if k not in runner and not (k - 1 in runner and "=" not in argv[k - 1])]
    argv.append(f"--runner={DASK_RUNNER}")
    if not any(a.split("=")[0] in ("--dask_npartitions", "--dask_partition_size") for a in argv):
        argv.append("--dask_partition_size=1")
    return argv


def is_dask_runner(options: PipelineOptions) -> bool:
    return (options.get_all_options().get("runner") or "").split(".")[-1] == "DaskRunner"


def is_local_runner(options: PipelineOptions) -> bool:
    runner = options.get_all_options().get("runner") or "DirectRunner"
    return runner.split(".")[-1] in ("DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")


def threads_per_worker(options: PipelineOptions) -> int:
    """``--threads``, or on the DirectRunner the machine's cores shared among its worker processes
    (each would otherwise start one thread per core, and they would fight over the cores)."""
    import os

    chosen = options.view_as(EmbedOptions).threads
    if chosen or not is_local_runner(options):
        return chosen
    all_options = options.get_all_options()
    workers = all_options.get("direct_num_workers") or 1
    if all_options.get("direct_running_mode") not in ("multi_processing", "multi_threading"):
        workers = 1
    return max(1, (os.cpu_count() or 1) // max(1, workers))
