"""Documents: embed the elements of a user's own pipeline (dicts or Beam Rows), without checkpoints.

Consumes elements that hold a text field; produces the same elements with an embedding field added (a
list of floats). Within a bundle, elements are held until ``buffer_size`` of them have arrived (or the
bundle ends), then sorted by token length and cut into batches within the token budget, exactly as a
unit is in ``docembed run`` (``inference.embed_rows``); one model per worker process
(``embed.acquire_embedder``). Resuming after a failure is the user's pipeline's business here: nothing
is written but the elements.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from docembed.model import numerics
from docembed.transforms.embed import acquire_embedder
from docembed.errors import ModelFailed
from docembed.transforms.inference import embed_rows
from docembed.records import EmbedSettings


def text_of(element, field: str) -> str:
    """The element's text, from a dict's key or a Row's attribute; anything but a string is refused."""
    text = element.get(field) if isinstance(element, dict) else getattr(element, field, None)
    if not isinstance(text, str):
        raise ValueError(f"EmbedDocuments: an element has no text in field {field!r} (found "
                         f"{type(text).__name__}): {repr(element)[:200]}")
    return text


def with_embedding(element, field: str, vector: list[float]):
    """The element with ``field`` added: a new dict for a dict, a new Row for a Row."""
    if isinstance(element, dict):
        return {**element, field: vector}
    return beam.Row(**element._asdict(), **{field: vector})


class EmbedBundle(beam.DoFn):
    """Element -> the element with its embedding; batches sorted by length within each bundle."""

    def __init__(self, settings: EmbedSettings, text_field: str, embedding_field: str, buffer_size: int):
        self._settings = settings
        self._text_field, self._embedding_field = text_field, embedding_field
        self._buffer_size = buffer_size

    def setup(self):
        resolved = numerics.resolve(self._settings.device, self._settings.precision, self._settings.trained_dtype)
        self._embedder = acquire_embedder(self._settings, resolved)

    def start_bundle(self):
        self._held = []

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        self._held.append((element, timestamp, window))
        if len(self._held) >= self._buffer_size:
            yield from self._flush()

    def finish_bundle(self):
        yield from self._flush()

    def _flush(self):
        held, self._held = self._held, []
        if not held:
            return
        texts = [text_of(element, self._text_field) for element, _, _ in held]
        done = embed_rows(self._embedder, texts, self._settings)
        if done.failed:
            raise ModelFailed(f"EmbedDocuments: the model failed on {len(done.failed)} of {len(texts)} documents; "
                              f"the first: {next(iter(done.failed.values()))[:300]}")
        for (element, timestamp, window), vector in zip(held, done.vectors):
            yield WindowedValue(with_embedding(element, self._embedding_field, vector.tolist()), timestamp, [window])
