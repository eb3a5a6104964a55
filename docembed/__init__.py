"""docembed: offline, resumable batch document embedding on Apache Beam.

Parquet documents (an id and a text column) in, one Parquet row per document (``id``, ``embedding``,
chosen pass-through columns) out; a run killed at any moment resumes with the same command. The
package is laid out in the order a document flows, and by where each part runs::

    docembed/
      cli.py, __main__.py   the commands: run, status, verify, report, query, search, convert
      pipeline/             the launcher: options, planning, the Beam graph, a run's lifecycle
        admin/              commands on an output: status, verify, report, repair, manifest
      transforms/           the workers' stages: read -> prepare (tokens, windows, batches) -> embed -> commit
      model/                the model contract, used by both sides (no Beam)
      store/                the output folder's format (layout.py) and access to it
      quality/              statistics a unit carries, and drift between runs
      use/                  working with an output, without Beam: query, search, convert

For use inside your own Beam pipeline: ``EmbedDocuments`` (a PCollection of documents in, embeddings
out) and ``EmbedParquet`` (a whole resumable run, as one transform). For queries against an output:
``embed_queries(output_url, texts)`` (vectors made exactly as the output's).
"""

import logging

__version__ = "0.1.0"
__all__ = ["EmbedDocuments", "EmbedParquet", "embed_queries", "__version__"]

# Beam warns through the root logger, as it is first imported, that Google's API clients are absent
# (apache_beam/io/gcp/internal/clients/bigquery); docembed does not use them. A filter on the root
# logger itself drops that one record in any process that imports docembed before Beam (a user's own
# pipeline included), whether the record would reach a handler or logging's last resort.
_BEAM_GCP_NOTICE = ("apitools not found, and bigquery client libraries are not available despite the "
                    "import not raising an ImportError.")


def _drop_beam_gcp_notice(record: logging.LogRecord) -> bool:
    return record.msg != _BEAM_GCP_NOTICE


logging.getLogger().addFilter(_drop_beam_gcp_notice)


def __getattr__(name: str):
    # The public transforms are imported on first use: `docembed --version` and the workers' modules
    # (which import this package first) need not load Beam's graph-building code to start.
    if name in ("EmbedDocuments", "EmbedParquet"):
        from docembed.pipeline import api

        return getattr(api, name)
    if name == "embed_queries":
        from docembed.use.query import embed_queries

        return embed_queries
    raise AttributeError(f"module 'docembed' has no attribute {name!r}")
