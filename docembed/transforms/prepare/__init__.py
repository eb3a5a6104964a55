"""From texts to model inputs: ``tokens`` (each document tokenized once), ``chunk`` (windows of long
documents, for --long-docs chunks/mean) and ``batch`` (length-sorted batches within a token budget)."""
