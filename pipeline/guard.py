"""Guard: refuse to resume into an output folder whose vectors came from other settings."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from transforms.checkpoint import OutputFolder
from transforms.commit import FINGERPRINT_KEY
from transforms.errors import FingerprintMismatch
from transforms.records import EmbedSettings, with_defaults


def diff_fingerprints(stored: dict, current: dict) -> list[str]:
    """``field: stored -> current`` for every field that differs, in a stable order."""
    names = sorted(set(stored) | set(current))
    return [
        f"{name}: {stored.get(name)!r} -> {current.get(name)!r}"
        for name in names if stored.get(name) != current.get(name)
    ]


def stored_fingerprint(output: OutputFolder) -> dict | None:
    """From ``_manifest.json``, or from a part's Parquet metadata if the manifest is gone."""
    manifest = output.read_manifest()
    if manifest and "fingerprint" in manifest:
        return manifest["fingerprint"]
    for name in output.part_files()[:1]:
        with output.fs.open(output.path(name), "rb") as handle:
            metadata = pq.ParquetFile(handle).schema_arrow.metadata or {}
        if FINGERPRINT_KEY in metadata:
            return json.loads(metadata[FINGERPRINT_KEY])
    return None


def check_layout(output: OutputFolder, settings: EmbedSettings) -> None:
    """The id column, pass-through columns and ``--chunk-text`` decide the parts' schema (and the id
    column the duplicate check):
    a resume must keep them, or the dataset would mix schemas."""
    manifest = output.read_manifest() or {}
    stored = manifest.get("settings")
    if not stored:
        return
    now = {"id_column": settings.id_column, "passthrough_columns": list(settings.passthrough_columns),
           "chunk_text": settings.chunk_text}
    stored = {"chunk_text": False, **stored}  # outputs written before --chunk-text existed had none
    differences = diff_fingerprints({k: stored.get(k) for k in now}, now)
    if differences:
        raise FingerprintMismatch(
            f"{output.url} was written with other columns ({'; '.join(differences)}); rerun with the original "
            "columns, use --overwrite to start afresh, or choose a new --output"
        )


def check_fingerprint(output: OutputFolder, settings: EmbedSettings) -> None:
    """Vectors first (the more fundamental mismatch), then the parts' columns."""
    stored = stored_fingerprint(output)
    if stored is not None:
        _check_vectors(output, stored, settings)
    check_layout(output, settings)


def _check_vectors(output: OutputFolder, stored: dict, settings: EmbedSettings) -> None:
    differences = diff_fingerprints(with_defaults(stored), settings.fingerprint())
    if differences:
        raise FingerprintMismatch(
            f"{output.url} holds vectors made with other settings ({'; '.join(differences)}); "
            "rerun with the original settings, use --overwrite to start afresh, or choose a new --output"
        )
