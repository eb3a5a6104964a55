"""Metrics: every Beam metric docembed reports, in the ``docembed`` namespace (visible in the
Dataflow and Flink UIs and through ``PipelineResult.metrics()``)."""

from apache_beam.metrics import Metrics

NAMESPACE = "docembed"

DOCS_READ = Metrics.counter(NAMESPACE, "docs_read")
DOCS_EMBEDDED = Metrics.counter(NAMESPACE, "docs_embedded")
DOCS_REJECTED = Metrics.counter(NAMESPACE, "docs_rejected")
DOCS_TRUNCATED = Metrics.counter(NAMESPACE, "docs_truncated")
TOKENS = Metrics.counter(NAMESPACE, "tokens_embedded")
TOKENS_DROPPED = Metrics.counter(NAMESPACE, "tokens_dropped")  # --long-docs truncate: beyond the window
CHUNKS = Metrics.counter(NAMESPACE, "chunks_embedded")  # --long-docs chunks: rows written
BATCHES = Metrics.counter(NAMESPACE, "batches")
UNITS_COMMITTED = Metrics.counter(NAMESPACE, "units_committed")
UNITS_SKIPPED = Metrics.counter(NAMESPACE, "units_skipped")
UNITS_LEFT = Metrics.counter(NAMESPACE, "units_left_on_stop")
REJECTS_RETRIED = Metrics.counter(NAMESPACE, "units_rejects_retried")  # --retry-rejects commits
BATCH_DOCS = Metrics.distribution(NAMESPACE, "batch_docs")
BATCH_TOKENS = Metrics.distribution(NAMESPACE, "batch_tokens")
BATCH_LATENCY_MS = Metrics.distribution(NAMESPACE, "batch_latency_ms")
