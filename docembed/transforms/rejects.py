"""Rejects: the record of input rows that were not embedded, each with a reason code and a message.

Every input row ends as exactly one of two things: a row of a part file, or a row of a unit's
``_rejects/<unit_id>.parquet``, committed with its unit. The reason codes:

- ``null_id``: the id is null;
- ``invalid_utf8``: the text column holds bytes that are not valid UTF-8;
- ``empty_text``: the text is null, empty or only whitespace;
- ``duplicate_id``: the id was seen earlier in the input or is already in the output
  (``--on-duplicate-id keep-first``);
- ``unreadable_file``: the file's data could not be decoded (``--skip-bad-files``);
- ``model_error``: the model failed on this document alone, after its batch was split down to it.
"""

from __future__ import annotations

import pyarrow as pa

from docembed.store.layout import REJECTS_SCHEMA as SCHEMA

MESSAGES = {
    "null_id": "the id is null",
    "invalid_utf8": "the text is bytes that are not valid UTF-8",
    "empty_text": "the text is null, empty or only whitespace",
}


def rejections(ids: pa.Array, rows: pa.Array, source: str, reasons: list[str],
               messages: list[str] | None = None) -> pa.Table:
    """A rejects table; ``messages`` default to the standard message of each reason."""
    if messages is None:
        messages = [MESSAGES[r] for r in reasons]
    return pa.table(
        {
            "id": pa.array(ids, pa.string()) if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids,
            "source": pa.array([source] * len(reasons), pa.string()),
            "row_index": rows,
            "reason": pa.array(reasons, pa.string()),
            "message": pa.array(messages, pa.string()),
        },
        schema=SCHEMA,
    )


def empty() -> pa.Table:
    return SCHEMA.empty_table()
