"""Manifest: what ``_manifest.json`` records about a run (written at the start, completed at the end)."""

from __future__ import annotations

import importlib.metadata
import time

from pipeline.plan import Plan
from pipeline.output import marker_totals
from transforms import storage
from transforms.checkpoint import parts_of
from transforms.records import EmbedSettings

_LIBRARIES = ("apache-beam", "torch", "transformers", "sentence-transformers", "pyarrow")


def started(settings: EmbedSettings, plan: Plan, checkpoint_every: int) -> dict:
    return {
        "status": "running",
        "run_id": settings.run_id,
        "started_at": time.time(),
        "fingerprint": settings.fingerprint(),
        "model": {"name": settings.model, "revision": settings.model_revision, "dim": settings.dim,
                  "source": settings.model_ref.kind, "location": storage.redact(settings.model_ref.location)},
        "settings": {
            "id_column": settings.id_column,
            "text_column": settings.text_column,
            "passthrough_columns": list(settings.passthrough_columns),
            "chunk_text": settings.chunk_text,
            "min_batch_size": settings.min_batch_size,
            "max_batch_size": settings.max_batch_size,
            "max_batch_tokens": settings.max_batch_tokens,
            "checkpoint_every": checkpoint_every,
            "device": settings.device,  # as asked (or adopted from the output); workers resolve auto
            "precision": settings.precision,
        },
        # The launcher's; the workers' are in each done-marker's numerics.
        "launcher_libraries": {name: _version(name) for name in _LIBRARIES},
        "inputs": [f.to_json() for f in plan.files],
        "skipped_files": list(plan.skipped),
        "plan": {"files": len(plan.files), "units": len(plan.units), "rows": plan.rows,
                 "text_bytes": sum(u.text_bytes for u in plan.units)},
    }


def completed(manifest: dict, markers: dict[str, dict], plan: Plan, numerics: dict | None = None,
              quantization: dict | None = None, canaries: dict | None = None) -> dict:
    planned = {u.unit_id for u in plan.units}
    mine = [m for uid, m in sorted(markers.items()) if uid in planned]
    totals = marker_totals(mine)  # rows: chunks under --long-docs chunks, else documents
    counts = {"input_rows": plan.rows, **{k: totals[k] for k in (
        "embedded", "rejected", "truncated", "rows", "tokens", "text_tokens", "dropped_tokens")}}
    earlier = [m for uid, m in sorted(markers.items()) if uid not in planned]
    return {
        **manifest,
        "status": "complete",
        "finished_at": time.time(),
        "numerics": numerics,  # the device and precision the output's vectors were made at
        # --output-dtype int8/uint8: the calibration every part was bucketed with, to quantize queries alike.
        **({"quantization": quantization} if quantization else {}),
        # The canary texts' vectors as the first commit made them (_canaries.json), and its numerics.
        **({"canaries": canaries} if canaries else {}),
        "counts": counts,
        "parts": [name for m in mine for name in parts_of(m)],
        "rejects": [m["rejects"] for m in mine if m.get("rejects")],
        "units_from_other_inputs": [{"unit_id": m["unit_id"], "source": m["source"],
                                     "parts": parts_of(m)}
                                    for m in earlier],
    }


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
