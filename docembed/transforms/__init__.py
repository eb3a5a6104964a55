"""The workers' stages, one work unit per element, in the order a document flows:

- ``read``: a WorkUnit's rows from its Parquet file (id, text, pass-through), bad rows to ``rejects``;
  ``digest`` fingerprints the texts read; ``dedup`` finds ids repeated across units.
- ``prepare/``: ``tokens`` (one tokenization per document), ``chunk`` (windows of long documents) and
  ``batch`` (length-sorted batches within a token budget).
- ``embed``: the DoFn that loads the model once per process (``docembed.model``) and runs ``inference``,
  the batch loop; ``documents`` is the same for ``EmbedDocuments``' PCollections.
- ``commit``: the unit's Parquet part and rejections, published atomically, then its done-marker
  (through ``docembed.store.units``); ``metrics``: Beam counters.

Nothing here imports ``docembed.pipeline`` (.importlinter): a worker needs no launcher code.
"""
