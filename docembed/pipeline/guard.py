"""Guard: refuse to resume into an output folder whose vectors came from other settings or numerics."""

from __future__ import annotations

import dataclasses
import json

from docembed.store.admin import OutputAdmin
from docembed.store.layout import FINGERPRINT_KEY
from docembed.errors import FingerprintMismatch
from docembed.records import EmbedSettings, with_defaults


def diff_fingerprints(stored: dict, current: dict) -> list[str]:
    """``field: stored -> current`` for every field that differs, in a stable order."""
    names = sorted(set(stored) | set(current))
    return [
        f"{name}: {stored.get(name)!r} -> {current.get(name)!r}"
        for name in names if stored.get(name) != current.get(name)
    ]


def stored_fingerprint(output: OutputAdmin, manifest: dict | None) -> dict | None:
    """From ``_manifest.json``, or from a part's Parquet metadata if the manifest is gone."""
    if manifest and "fingerprint" in manifest:
        return manifest["fingerprint"]
    for name in output.part_files()[:1]:
        metadata = output.part_metadata(name)
        if FINGERPRINT_KEY in metadata:
            return json.loads(metadata[FINGERPRINT_KEY])
    return None


def check_layout(output: OutputAdmin, settings: EmbedSettings, manifest: dict | None) -> None:
    """The id column, pass-through columns and ``--chunk-text`` decide the parts' schema (and the id
    column the duplicate check):
    a resume must keep them, or the dataset would mix schemas."""
    stored = (manifest or {}).get("settings")
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


def check_fingerprint(output: OutputAdmin, settings: EmbedSettings, manifest: dict | None) -> None:
    """Vectors first (the more fundamental mismatch), then the parts' columns. ``manifest``: the
    output's, as read once by the caller (None when there is none, or it is damaged)."""
    stored = stored_fingerprint(output, manifest)
    if stored is not None:
        _check_vectors(output, stored, settings)
    check_layout(output, settings, manifest)


def _check_vectors(output: OutputAdmin, stored: dict, settings: EmbedSettings) -> None:
    differences = diff_fingerprints(with_defaults(stored), settings.fingerprint())
    if differences:
        raise FingerprintMismatch(
            f"{output.url} holds vectors made with other settings ({'; '.join(differences)}); "
            "rerun with the original settings, use --overwrite to start afresh, or choose a new --output"
        )


def output_numerics(output: OutputAdmin, manifest: dict | None) -> dict | None:
    """The device and precision of the output's vectors: ``_numerics.json``, pinned by the first
    commit; for outputs written before it existed, the manifest's device and fingerprint precision."""
    pinned = output.read_numerics()
    if pinned is not None:
        return pinned
    manifest = manifest or {}
    device, precision = (manifest.get("settings") or {}).get("device"), (manifest.get("fingerprint") or {}).get("precision")
    return {"device": device, "precision": precision} if device and precision and output.done_ids() else None


def adopt_numerics(output: OutputAdmin, settings: EmbedSettings, manifest: dict | None) -> EmbedSettings:
    """``settings`` with the output's device and precision in place of ``auto``, so that its workers
    make vectors like the ones already there; an explicit request for others is refused."""
    pinned = output_numerics(output, manifest)
    if pinned is None:
        return settings
    clashes = [f"--{name} {asked} (the output's: {pinned[name]})"
               for name, asked in (("device", settings.device), ("precision", settings.precision))
               if asked not in ("auto", pinned[name])]
    if clashes:
        raise FingerprintMismatch(
            f"{output.url} holds vectors made at {pinned['device']} {pinned['precision']}, and this run asks for "
            f"{', '.join(clashes)}: one output never mixes numerics; pass the output's (or auto), use --overwrite "
            "to start afresh, or choose a new --output"
        )
    return dataclasses.replace(settings, device=pinned["device"], precision=pinned["precision"])
