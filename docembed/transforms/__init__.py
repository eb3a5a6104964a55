"""docembed stages: read -> batch -> embed -> commit, one work unit per element.

Each module is one stage of the worker-side flow:

- ``read``: a WorkUnit's rows from its Parquet file (id, text, pass-through).
- ``tokens`` and ``batch``: token lengths, then length-sorted batches within a token budget.
- ``model`` and ``embed``: the model contract, and the DoFn that loads it once per process.
- ``commit``: the unit's Parquet part, published atomically, then its done-marker.
- ``checkpoint``: the single owner of every bookkeeping name and of resume state.
"""
