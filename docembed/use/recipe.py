"""Recipe: how an output's vectors were made, read back from the output itself.

Everything a reader of an output needs to make vectors comparable with its own lives in the output
folder: the manifest's fingerprint (model, pinned revision, window, prompt, pooling, normalisation,
truncation dimension, stored dtype), the model's reference (where its files come from), the numerics
the vectors were made at (``_numerics.json``) and the int8/uint8 calibration (``_quantization.json``).
``read_recipe`` gathers them into one ``Recipe``; nothing is guessed from the model's defaults.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from docembed import vectors
from docembed.errors import ModelError, UsageError
from docembed.model.ref import ModelRef
from docembed.records import with_defaults
from docembed.store.admin import OutputAdmin


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An output's vector settings (``fingerprint``: the manifest's, older fields filled in), its
    model reference, its numerics (None before its first commit), its calibration (int8/uint8),
    its columns, and the manifest's status."""

    url: str
    fingerprint: dict
    model_ref: ModelRef
    numerics: dict | None
    ranges: np.ndarray | None
    id_column: str
    passthrough_columns: tuple[str, ...]
    status: str

    @property
    def output_dtype(self) -> str:
        return self.fingerprint["output_dtype"]

    @property
    def dim(self) -> int:
        return int(self.fingerprint["dim"])

    @property
    def width(self) -> int:
        """Values per stored vector (``vectors.width``: bytes for the binary forms)."""
        return vectors.width(self.output_dtype, self.dim)

    @property
    def chunks(self) -> bool:
        """Whether the output holds a row per window (``--long-docs chunks``)."""
        return self.fingerprint.get("long_docs") == "chunks"

    def model_settings(self, prefix: str | None = None) -> dict:
        """The ``Embedder`` arguments that make the output's vectors (``prefix``: another prompt in
        place of the documents' own)."""
        return model_settings(self.fingerprint, prefix)


def read_recipe(url: str) -> Recipe:
    """The Recipe of the output at ``url``; an output without a manifest, or one whose calibration a
    quantized dtype needs but lacks (nothing committed yet), is refused with what to do."""
    output = OutputAdmin(url)
    manifest = output.read_manifest()
    if manifest is None or "fingerprint" not in manifest:
        raise UsageError(f"{url} holds no docembed output (no _manifest.json): pass the --output of a run")
    fingerprint = with_defaults(manifest["fingerprint"])
    ref = model_ref(manifest)
    numerics = output.read_numerics() or manifest.get("numerics")
    ranges = None
    if fingerprint["output_dtype"] in vectors.CALIBRATED:
        quantization = output.read_quantization() or manifest.get("quantization")
        if not quantization:
            raise UsageError(f"{url} stores {fingerprint['output_dtype']} vectors but has no calibration yet "
                             "(_quantization.json is pinned by its first commit): wait for a unit to commit")
        ranges = np.asarray(quantization["ranges"], dtype=np.float32)
    settings = manifest.get("settings") or {}
    return Recipe(url, fingerprint, ref, numerics, ranges, settings.get("id_column", "id"),
                  tuple(settings.get("passthrough_columns") or ()), manifest.get("status", "unknown"))


def model_ref(manifest: dict) -> ModelRef:
    """The output's model reference, as its manifest records it (where the files are, and the pin)."""
    model = manifest.get("model") or {}
    fingerprint = manifest["fingerprint"]
    if model.get("source") in ("store", "local") and not model.get("location"):
        raise ModelError("the manifest does not say where the model's files are (written before docembed recorded "
                         "it): rerun into the output once to record it")
    return ModelRef(fingerprint["model"], model.get("source", "hub"), fingerprint["model_revision"],
                    model.get("location", ""))


def model_settings(fingerprint: dict, prefix: str | None = None) -> dict:
    """``Embedder``'s keyword arguments for a fingerprint (``with_defaults`` applied)."""
    return {"normalize": fingerprint["normalize"], "max_seq_length": fingerprint["max_seq_length"],
            "prefix": fingerprint["prefix"] if prefix is None else prefix,
            "truncate_dim": fingerprint["truncate_dim"], "trust_remote_code": fingerprint["trust_remote_code"]}


@functools.lru_cache(maxsize=1)
def model_folder(ref: ModelRef):
    """The model's folder on this machine, its files checked against the pin (hashed once)."""
    from docembed.model.ref import materialize

    return materialize(ref)


@functools.lru_cache(maxsize=1)
def load_model(ref: ModelRef, device: str, precision: str, **settings):
    """The output's model in this environment (the last one asked for is kept: verifying or
    querying outputs of one model one after another loads it once)."""
    from docembed.model.embedder import Embedder

    return Embedder(model_folder(ref), device, precision, **settings)
