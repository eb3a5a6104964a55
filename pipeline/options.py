"""Options: the one PipelineOptions subclass for docembed's flags, and our own validation of it.

Beam's own flags (``--runner``, ``--direct_num_workers``, ``--project``, ...) parse alongside these.
Beam neither validates subclass options nor rejects unknown flags, so ``parse`` does both.
"""

from __future__ import annotations

import argparse

from apache_beam.options.pipeline_options import PipelineOptions

from transforms.errors import UsageError
from transforms.model import DEFAULT_MODEL


class EmbedOptions(PipelineOptions):
    """docembed's flags. No ``required=True`` here: it would break every PipelineOptions in the process."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add = parser.add_argument
        add("--input", help="Parquet file, folder or glob; any fsspec URL (local, gs://, s3://, memory://)")
        add("--output", help="output folder URL; becomes a Parquet dataset")
        add("--id-column", default="id", help="column holding each document's id (default: id)")
        add("--text-column", default="text", help="column holding the text to embed (default: text)")
        add("--passthrough-columns", default="", help="comma-separated input columns copied to the output")
        add("--model", default=DEFAULT_MODEL, help="hub id or local folder of a sentence-transformers model")
        add("--model-revision", default=None, help="hub revision (branch, tag or commit) to pin")
        add("--max-seq-length", type=int, default=None, help="token window; default: the model's own")
        add("--normalize", action=argparse.BooleanOptionalAction, default=None,
            help="L2-normalise vectors; default: as the model's own config says")
        add("--prefix", default="", help="text put before every document, e.g. 'passage: ' for e5 models")
        add("--min-batch-size", type=int, default=64, help="documents per batch, at least (default 64)")
        add("--max-batch-size", type=int, default=256, help="documents per batch, at most (default 256)")
        add("--max-batch-tokens", type=int, default=None,
            help="padded tokens per batch, at most; default: min-batch-size x window")
        add("--checkpoint-every", type=int, default=10000,
            help="rows per work unit; a unit is committed and checkpointed as a whole (default 10000)")
        add("--threads", type=int, default=0,
            help="CPU threads per worker process for the model; 0 (default): cores / local worker "
                 "processes on the DirectRunner, the library default elsewhere")
        add("--device", default="auto", choices=["auto", "cpu", "cuda"])
        add("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16", "int8"],
            help="auto: fp16 on CUDA, fp32 on the CPU; bf16 on CPUs with native bf16; int8 on CPUs with VNNI")
        add("--on-duplicate-id", default="error", choices=["error", "keep-first"],
            help="a repeated id: fail at planning with examples (error), or embed the first occurrence "
                 "and reject the others as duplicate_id (keep-first)")
        add("--skip-bad-files", action="store_true",
            help="leave out files that are not readable Parquet (recorded in the manifest and summary) "
                 "instead of failing")
        add("--overwrite", action="store_true", help="delete the output folder and start afresh")
        add("--wait-for-lock", type=float, default=0.0,
            help="seconds to wait for another run's lock on the output folder (default: fail at once)")
        add("--lock-ttl", type=float, default=60.0,
            help="seconds after which a lock whose heartbeat stopped (a run killed on another machine) is "
                 "taken over; a lock of a dead process on this machine is taken over at once")
        add("--grace-period", type=float, default=60.0,
            help="on SIGTERM, seconds to let the unit in hand finish before abandoning it")
        add("--cost-per-hour", type=float, default=None,
            help="what the machines of this run cost per hour, for the report's cost per 1000 documents")
        add("--progress", action=argparse.BooleanOptionalAction, default=True,
            help="show a progress bar (local runners)")


def parse(argv: list[str]) -> PipelineOptions:
    """PipelineOptions for ``argv``; raises UsageError naming every problem found."""
    options = PipelineOptions(argv)
    unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    problems = [f"unknown flag --{name}" for name in sorted(unknown)]
    problems += validate(options.view_as(EmbedOptions))
    if problems:
        raise UsageError("; ".join(problems))
    return options


def validate(opts: EmbedOptions) -> list[str]:
    problems = []
    if not opts.input:
        problems.append("--input is required")
    if not opts.output:
        problems.append("--output is required")
    if not 1 <= opts.min_batch_size <= opts.max_batch_size:
        problems.append(
            f"--min-batch-size {opts.min_batch_size} must be >= 1 and <= --max-batch-size {opts.max_batch_size}"
        )
    if opts.checkpoint_every < 1:
        problems.append(f"--checkpoint-every must be >= 1, got {opts.checkpoint_every}")
    if opts.cost_per_hour is not None and opts.cost_per_hour < 0:
        problems.append(f"--cost-per-hour must be >= 0, got {opts.cost_per_hour}")
    if opts.lock_ttl <= 0:
        problems.append(f"--lock-ttl must be > 0 seconds, got {opts.lock_ttl}")
    clashes = sorted({"id", "embedding", "_row"} & set(passthrough(opts)) - {opts.id_column})
    if clashes or ("id" in passthrough(opts) and opts.id_column != "id"):
        problems.append(f"--passthrough-columns {', '.join(clashes or ['id'])}: these names are the output's own "
                        "columns (id, embedding); rename the input column")
    if opts.threads < 0:
        problems.append(f"--threads must be >= 0, got {opts.threads}")
    if opts.max_seq_length is not None and opts.max_seq_length < 2:
        problems.append(f"--max-seq-length must be >= 2, got {opts.max_seq_length}")
    return problems


def passthrough(opts: EmbedOptions) -> tuple[str, ...]:
    return tuple(c.strip() for c in (opts.passthrough_columns or "").split(",") if c.strip())


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
