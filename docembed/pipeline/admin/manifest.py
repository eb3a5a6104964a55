"""Manifest: what ``_manifest.json`` records about a run: written at the start (status "running"),
completed at the end ("complete"), or, when the run stops short, how it ended: "interrupted" (a stop
signal) or "failed" (with its error), and when (``record_end``)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import time

from docembed.pipeline.plan import Plan
from docembed.store.admin import OutputAdmin, marker_totals, one_line
from docembed.store import storage
from docembed.store.layout import parts_of
from docembed.errors import Interrupted
from docembed.records import EmbedSettings

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
        "embedded", "rejected", "truncated", "rows", "tokens", "text_tokens", "dropped_tokens", "dropped_estimated")}}
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


def ended(manifest: dict, status: str, error: str = "") -> dict:
    """``manifest`` as a run that stopped short leaves it: ``status`` ("interrupted" or "failed"), when
    (``ended_at``) and, for a failure, the error (one line)."""
    return {**manifest, "status": status, "ended_at": time.time(), **({"error": error} if error else {})}


def how_it_ended(exc: BaseException) -> tuple[str, str]:
    """(status, error) for a run stopped by ``exc``: a stop signal interrupts it, anything else fails it."""
    if isinstance(exc, Interrupted):
        return "interrupted", ""
    return "failed", storage.redact_text(one_line(exc))[:1000]


@contextlib.contextmanager
def record_end(output: OutputAdmin, run_id: str):
    """Around a run holding the lock: when it raises, the manifest this run started says how it ended
    (``ended``). A manifest that is not this run's (it stopped before writing its own) is left as it
    is. Where the manifest cannot be read or written, a note on the error says so: the error that
    stopped the run stays the news."""
    try:
        yield
    except BaseException as exc:
        status, error = how_it_ended(exc)
        try:
            current, _ = output.load_manifest()
            if current and current.get("run_id") == run_id:
                output.write_manifest(ended(current, status, error))
        except OSError as failed:
            why = "the same error" if one_line(failed) == one_line(exc) else one_line(failed)
            exc.add_note(f"the manifest could not record that the run {status} ({why}), so it may still say "
                         "'running'")
        raise


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
