"""The model, used by both sides and importing no Beam: ``card`` (what the launcher knows of a model from
its configuration files), ``embedder`` (the worker's model behind a narrow contract), ``stack`` (the
sentence-transformers modules), ``ref`` (pinning a model to a reference every worker resolves),
``numerics`` (device and precision), ``quantize`` (int8 on the CPU) and ``canaries`` (texts whose
vectors tell another numerics apart)."""
