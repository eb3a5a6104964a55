"""API: docembed as PTransforms for a user's own Beam pipeline.

``EmbedParquet`` is ``docembed run`` inside a user's pipeline: the same plan, guards, lock, commits and
manifest. What must happen before the graph runs (planning, refusing an output made otherwise, taking
the lock, writing the plan, finding repeated ids: a small Beam job of its own on the same runner) and
after it (completing the manifest, the report, releasing the lock) has
its home in the transform's context manager, around the pipeline::

    with EmbedParquet("in/", "out/") as embed, beam.Pipeline() as p:
        p | embed

``EmbedDocuments`` embeds a PCollection of dicts or Beam Rows: each element comes out with an embedding
field added. The model is pinned and described when the transform is applied, on the machine that
builds the pipeline (as ``docembed run``'s launcher does: a reference every worker resolves, checked
against the description); the embedding runs on the workers (``docembed.transforms.documents``). It writes
nothing and keeps no checkpoints: that is the pipeline's business.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time

import apache_beam as beam

from docembed.pipeline.admin import manifest
from docembed.pipeline.graph import build_graph
from docembed.pipeline.jobs import as_flags
from docembed.pipeline.lock import OutputLock
from docembed.pipeline.options import EmbedOptions, is_dask_runner, is_local_runner, parse
from docembed.store.admin import write_errors
from docembed.pipeline.execute import find_duplicates
from docembed.pipeline.run import add_report, after_job, before_job, check_writable, prepare
from docembed.pipeline.settings import resolve_settings
from docembed.transforms.documents import EmbedBundle
from docembed.errors import UsageError
from docembed.model.ref import DEFAULT_MODEL


class EmbedDocuments(beam.PTransform):
    """PCollection of dicts or Rows with a ``text_field`` -> the same elements with ``embedding_field``
    (a list of floats).

    Args:
        model: a hub id (``BAAI/bge-base-en-v1.5``, optionally ``@revision``), a local folder or an
            fsspec URL of one; default the bundled all-MiniLM-L6-v2.
        text_field: the field holding each element's text.
        embedding_field: the field added to each element.
        buffer_size: elements a worker gathers before it sorts them by length and embeds them.
        **options: ``docembed run``'s options as keyword arguments (``precision="bf16"``,
            ``prompt_name="query"``, ``truncate_dim=256``, ``long_docs="mean"``, ...), parsed and checked
            as the command's are (docs/OPTIONS.md); a wrong one raises ``UsageError``.
    """

    def __init__(self, model: str = DEFAULT_MODEL, text_field: str = "text", embedding_field: str = "embedding", *,
                 buffer_size: int = 4096, **options):
        super().__init__()
        flags = as_flags({"model": model, "text_column": text_field, **options}, "EmbedDocuments")
        self._opts = parse(flags, paths=False).view_as(EmbedOptions)
        self._fields = (text_field, embedding_field, buffer_size)

    def expand(self, documents):
        # The model pinned and described as docembed run's launcher does it, for the pipeline's runner.
        settings = resolve_settings(self._opts, threads=self._opts.threads,
                                    local_runner=is_local_runner(documents.pipeline.options))
        return documents | "Embed" >> beam.ParDo(EmbedBundle(settings, *self._fields))


class EmbedParquet(beam.PTransform):
    """``docembed run`` as a transform: Parquet input -> parts, done-markers and manifest in the output,
    resumable exactly as the command is.

    Apply it to the pipeline inside ``with EmbedParquet(...) as embed:``; after the pipeline has run,
    leaving the block completes the manifest, writes the run report and releases the lock (``summary``
    then holds what ``docembed run`` prints). A pipeline that fails keeps its committed units: enter
    again to resume.

    Args:
        input: a Parquet file, a folder (read recursively) or a glob, local or any fsspec URL
            (``gs://``, ``s3://``, ...).
        output: the output folder (any fsspec URL).
        **options: ``docembed run``'s options as keyword arguments (``checkpoint_every=10000``,
            ``model="BAAI/bge-base-en-v1.5"``, ``passthrough_columns="title,url"``, and Beam's, such as
            ``runner="DataflowRunner"``), parsed and checked as the command's are (docs/OPTIONS.md).
    """

    def __init__(self, input: str, output: str, **options):
        super().__init__()
        self._argv = ["--input", input, "--output", output, *as_flags(options, "EmbedParquet")]
        self._job = None
        self.summary = None

    def __enter__(self):
        self._started, self._started_at = time.monotonic(), time.time()
        options, self._opts, self._output, self._plan, settings = prepare(self._argv)
        self._local = is_local_runner(options)
        check_writable(self._output)
        # As `docembed run`: a failing write is one WriteFailed, and the manifest says how a run ended.
        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(write_errors(self._output.url))
            self._lock = self._stack.enter_context(OutputLock(self._output, self._opts.lock_ttl,
                                                              self._opts.wait_for_lock))
            self._stack.enter_context(manifest.record_end(self._output, settings.run_id))
            if self._opts.overwrite:
                self._output.remove_all()
            self._job = before_job(self._opts, self._output, self._plan,
                                   dataclasses.replace(settings, lock_token=self._lock.token), is_dask_runner(options))
            if self._job.plan:  # its own small job, run to the end before the user's pipeline runs
                find_duplicates(options, self._job, self._local)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())  # raises what the stack makes of it (WriteFailed, ...)
            raise
        return self

    def expand(self, root):
        if self._job is None:
            raise RuntimeError("apply EmbedParquet inside `with EmbedParquet(...) as embed:`: its plan and "
                               "lock are taken when the block is entered")
        if is_local_runner(root.pipeline.options) != self._local:
            raise UsageError("EmbedParquet was given another runner than the pipeline's: pass the pipeline's "
                             "runner options (runner=..., project=..., ...) to EmbedParquet too")
        if not self._job.plan:  # everything is done already
            return root | "NothingToDo" >> beam.Create([])
        return build_graph(root, self._job.plan, self._job.settings)

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                if self._job.plan:
                    self._output.remove_plan()
                self.summary = after_job(self._output, self._job, {})
                add_report(self.summary, self._output, self._started, self._started_at, 0, None)
                self._lock.check()
        except BaseException:
            if not self._stack.__exit__(*sys.exc_info()):
                raise
            return False
        self._stack.__exit__(*exc)
        return False