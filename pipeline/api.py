"""API: docembed as PTransforms for a user's own Beam pipeline.

``EmbedDocuments`` embeds a PCollection of dicts or Beam Rows: each element comes out with an embedding
field added. The model is pinned and described when the transform is applied, on the machine that
builds the pipeline (as ``docembed run``'s launcher does: a reference every worker resolves, checked
against the description); the embedding runs on the workers (``transforms.documents``). It writes
nothing and keeps no checkpoints: that is the pipeline's business.
"""

from __future__ import annotations

import apache_beam as beam

from pipeline.options import is_local_runner
from pipeline.pin import pin_model
from pipeline.run import batch_budget, prompt_text
from transforms.documents import EmbedBundle
from transforms.model import describe
from transforms.model_ref import DEFAULT_MODEL
from transforms.numerics import check_request
from transforms.records import EmbedSettings


class EmbedDocuments(beam.PTransform):
    """PCollection of dicts or Rows with a ``text_field`` -> the same elements with ``embedding_field``
    (a list of floats). The options are ``docembed run``'s, as keyword arguments."""

    def __init__(self, model: str = DEFAULT_MODEL, text_field: str = "text", embedding_field: str = "embedding", *,
                 model_revision: str | None = None, device: str = "auto", precision: str = "auto",
                 max_seq_length: int | None = None, prefix: str = "", prompt_name: str | None = None,
                 truncate_dim: int | None = None, normalize: bool | None = None, trust_remote_code: bool = False,
                 min_batch_size: int = 64, max_batch_size: int = 256, max_batch_tokens: int | None = None,
                 threads: int = 0, buffer_size: int = 4096):
        super().__init__()
        check_request(device, precision)
        self._asked = dict(model=model, model_revision=model_revision, device=device, precision=precision,
                           max_seq_length=max_seq_length, prefix=prefix, prompt_name=prompt_name,
                           truncate_dim=truncate_dim, normalize=normalize, trust_remote_code=trust_remote_code,
                           min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                           max_batch_tokens=max_batch_tokens, threads=threads)
        self._fields = (text_field, embedding_field, buffer_size)

    def settings(self, local_runner: bool) -> EmbedSettings:
        """The model pinned and described, as ``docembed run``'s launcher does it."""
        a = self._asked
        ref, folder = pin_model(a["model"], a["model_revision"], local_runner)
        prefix = prompt_text(folder, a["prompt_name"]) if a["prompt_name"] else a["prefix"]
        card = describe(folder, a["max_seq_length"], prefix, a["truncate_dim"])
        return EmbedSettings(
            output="", model_ref=ref, dim=card.dim, max_seq_length=card.max_seq_length, pooling=card.pooling,
            normalize=card.has_normalize if a["normalize"] is None else a["normalize"], precision=a["precision"],
            device=a["device"], prefix=prefix, id_column="", text_column=self._fields[0], passthrough_columns=(),
            min_batch_size=a["min_batch_size"], max_batch_size=a["max_batch_size"],
            max_batch_tokens=batch_budget(a["max_batch_tokens"], a["min_batch_size"], card.max_seq_length),
            run_id="", threads=a["threads"], truncate_dim=a["truncate_dim"], trust_remote_code=a["trust_remote_code"])

    def expand(self, documents):
        settings = self.settings(is_local_runner(documents.pipeline.options))
        return documents | "Embed" >> beam.ParDo(EmbedBundle(settings, *self._fields))
