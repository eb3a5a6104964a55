"""Convert: a float32 output written again at another stored dtype (``--output-dtype``) and/or fewer
Matryoshka dimensions (``--truncate-dim``), without re-embedding (``docembed convert``), without Beam.

Input: SRC, an output a ``docembed run`` completed, stored as float32 (float16 and the quantized dtypes
have already lost what a direct run at another dtype keeps, so they are refused). Output: DST, the
folder a direct ``docembed run --output-dtype D [--truncate-dim N]`` of SRC's input with SRC's model
leaves, in every record ``run``, ``status`` and ``verify`` read: the fingerprint (SRC's with
``output_dtype``, and ``dim`` and ``truncate_dim`` for a cut, changed), the same units (unit id, row
range, counts; rejections copied) whose parts hold the new ``embedding`` column (the fingerprint in
their metadata changed, the unit and numerics kept), SRC's numerics, SRC's canaries (cut like the
vectors), the int8/uint8 calibration, and a completed manifest that also says where DST came from
(``converted_from``). So ``docembed run`` with those flags takes DST as its own, and resumes it.

Like a run, a convert holds DST's lock, publishes each unit's part first and its done-marker last
(atomically, ``UnitStore.publish``), and resumes when the same command runs again: a unit whose DST
marker was converted from SRC's commit as it is now is skipped; one converted from another commit
(SRC was resumed or changed since) is taken back and done again. Units go in SRC's commit order (its
markers' ``committed_at``), so that the int8/uint8 calibration, which DST's first part pins through
``UnitStore.quantization_ranges`` exactly as a run's first commit pins it, comes from the unit SRC
committed first.

``--truncate-dim N`` keeps the first N dimensions and, where the output's vectors are normalised,
L2-normalises them again, as ``Embedder.forward`` does in a run. SRC holds vectors normalised whole;
cutting those and normalising again gives the direction that cutting the model's raw vector gives
(they differ by a positive factor), so the vectors equal a direct run's to float rounding. Of the
markers' quality statistics, the mean vector and mean square are recomputed from the cut vectors; the
histogram of norms before normalisation stays the full vectors' (SRC does not hold the raw vectors).

A convert is a launcher's job, like a run: it takes DST's lock (``lock.OutputLock``), records how it
ended in DST's manifest (``manifest.record_end``), and judges damaged units as a run does
(``repair.find``). It runs in this process, without a Beam job: re-bucketing vectors costs far less
than reading and writing them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import pyarrow as pa

from docembed import vectors
from docembed.errors import DamagedRecord, FingerprintMismatch, OutputError, UsageError
from docembed.model.canaries import THRESHOLD as CANARY_THRESHOLD
from docembed.quality import stats as quality
from docembed.records import with_defaults
from docembed.store import storage
from docembed.pipeline.admin import manifest, repair
from docembed.pipeline.guard import diff_fingerprints
from docembed.pipeline.lock import OutputLock
from docembed.pipeline.run import check_writable
from docembed.pipeline.settings import new_run_id
from docembed.store.admin import OutputAdmin, write_errors
from docembed.store.layout import FINGERPRINT_KEY, files_of, parts_of
from docembed.text import plural
from docembed.transforms.commit import parquet_bytes

LOCK_TTL_S = 60.0  # as `docembed run --lock-ttl`'s default: a run judges DST's lock at its own TTL
# What a run's manifest gains at its end, or when it stops short: a convert writes its own; of these,
# what DST's units hold is SRC's (``_COUNTED``), and the rest is DST's.
_COUNTED = ("counts", "parts", "rejects", "units_from_other_inputs")
_ENDING = ("finished_at", "ended_at", "error", "numerics", "quantization", "canaries", *_COUNTED)


@dataclasses.dataclass(frozen=True)
class Target:
    """What DST stores: ``dtype``, and ``truncate_dim`` (None: SRC's dimensions); ``source``: SRC's
    fingerprint with older fields filled in (``with_defaults``)."""

    dtype: str
    truncate_dim: int | None
    source: dict

    @property
    def dim(self) -> int:
        return int(self.truncate_dim or self.source["dim"])

    def fingerprint(self) -> dict:
        """DST's fingerprint: SRC's, as a direct run with these flags records it."""
        changed = {"output_dtype": self.dtype}
        if self.truncate_dim:
            changed.update(dim=self.truncate_dim, truncate_dim=self.truncate_dim)
        return {**self.source, **changed}

    def shrink(self, floats: np.ndarray) -> np.ndarray:
        """The vectors as a run with ``--truncate-dim`` makes them: the first dimensions, L2-normalised
        again where the output's are (as ``torch.nn.functional.normalize``: eps 1e-12)."""
        if not self.truncate_dim:
            return floats
        cut = np.ascontiguousarray(floats[:, :self.truncate_dim], dtype=np.float32)
        if not self.source["normalize"]:
            return cut
        return (cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def target_of(fingerprint: dict, dtype: str, truncate_dim: int | None, url: str) -> Target:
    """The Target for SRC's ``fingerprint``; refused where SRC is not float32 (its values are already
    rounded or bucketed: DST would not be a direct run's), where ``truncate_dim`` keeps no fewer
    dimensions than SRC has, and where nothing would change."""
    source = with_defaults(fingerprint)
    stored, dim = source["output_dtype"], int(source["dim"])
    if stored != "float32":
        raise UsageError(f"{url} stores {stored} vectors: convert reads float32 outputs only, since {stored} has "
                         "already lost the precision a direct run at another dtype keeps; convert its float32 "
                         "output, or embed again with `docembed run --output-dtype ...`")
    if dtype not in vectors.OUTPUT_DTYPES:
        raise UsageError(f"--output-dtype {dtype}: not one of {', '.join(vectors.OUTPUT_DTYPES)}")
    if truncate_dim is not None and not 1 <= truncate_dim < dim:
        raise UsageError(f"--truncate-dim {truncate_dim}: {url}'s vectors have {dim} dimensions; keep from 1 to "
                         f"{dim - 1} of them, or leave --truncate-dim out")
    if truncate_dim is not None and source["long_docs"] == "mean" and source["normalize"]:
        # A run cuts and normalises each window's vector before averaging them; cutting the average of
        # whole normalised windows weighs the windows otherwise, so no convert gives the run's vectors.
        raise UsageError(f"--truncate-dim: {url} averages normalised window vectors (--long-docs mean), and a "
                         "run with --truncate-dim cuts each window before averaging: its vectors cannot be made "
                         "from these; embed again with `docembed run --truncate-dim ...`")
    if dtype == stored and truncate_dim is None:
        raise UsageError(f"{url} already stores float32 vectors of {dim} dimensions: pass another --output-dtype "
                         "or a --truncate-dim")
    return Target(dtype, truncate_dim, source)


@dataclasses.dataclass
class Source:
    """SRC as a convert reads it: its manifest, its done-markers in commit order, numerics, canaries."""

    output: OutputAdmin
    manifest: dict
    markers: list[dict]
    numerics: dict | None
    canaries: dict | None


def read_source(output: OutputAdmin) -> Source:
    """SRC, refused unless its last run completed and every unit's files are there as committed (a
    run still going, one stopped short, or damaged units would make DST a copy of something unfinished)."""
    found = output.read_manifest()
    if found is None or "fingerprint" not in found:
        raise UsageError(f"{output.url} holds no docembed output (no manifest): pass the --output of a run")
    if found.get("status") != "complete":
        raise UsageError(f"{output.url} is not a complete output (its manifest says {found.get('status')!r}): let its "
                         "run finish (rerun the same `docembed run` command), then convert")
    markers, unreadable = output.read_markers()
    damaged = [d.unit_id for d in repair.find(output)[1]]
    if damaged:
        raise UsageError(f"{output.url} has damaged units ({', '.join(damaged[:3])}"
                         f"{f' and {len(damaged) - 3} more' if len(damaged) > 3 else ''}): `docembed verify` says "
                         "what is wrong; rerun its `docembed run` to redo them, then convert")
    ordered = sorted(markers.values(), key=lambda m: (m.get("committed_at") or 0.0, m["unit_id"]))
    return Source(output, found, ordered, output.read_numerics() or found.get("numerics"), output.read_canaries())


def convert(source_url: str, dest_url: str, dtype: str, truncate_dim: int | None = None,
            overwrite: bool = False) -> dict:
    """Write SRC (``source_url``) into DST (``dest_url``) at ``dtype`` and ``truncate_dim``, resuming
    what an earlier convert into DST left; returns the summary (``format_conversion``). Once DST is
    found writable, a write that fails raises ``WriteFailed`` (exit 1), as in a run."""
    started = time.monotonic()
    src, dst = OutputAdmin(source_url), OutputAdmin(dest_url)
    _check_apart(src, dst)
    source = read_source(src)
    target = target_of(source.manifest["fingerprint"], dtype, truncate_dim, src.url)
    check_writable(dst, "--to")
    run_id = new_run_id()
    with write_errors(dst.url), OutputLock(dst, LOCK_TTL_S) as lock, manifest.record_end(dst, run_id):
        if overwrite:
            dst.remove_all()
        _check_destination(dst, source, target)
        done = _tidy(dst, source)
        record = _started_manifest(source, target, run_id)
        dst.write_manifest(record)
        todo = [m for m in source.markers if m["unit_id"] not in done]
        if todo:
            _pin(dst, source, target)
        for marker in todo:
            done[marker["unit_id"]] = _convert_unit(source, dst, marker, target, run_id, lock.check)
        dst.write_manifest(_completed_manifest(dst, source, record, done))
        lock.check()  # the work is done, but another run may have taken DST over meanwhile
    return _summarize(source, dst, target, todo, done, run_id, time.monotonic() - started)


def _check_apart(src: OutputAdmin, dst: OutputAdmin) -> None:
    """DST is neither SRC nor inside it, nor SRC inside DST: readers of a folder read its subfolders'
    parts too, and a convert into its own source would overwrite what it reads."""
    a, b = (_where(o).rstrip("/") + "/" for o in (src, dst))
    if a.startswith(b) or b.startswith(a):
        raise UsageError(f"--to {dst.url} and --output {src.url} are the same folder or one holds the other: "
                         "convert into a folder of its own")


def _where(output: OutputAdmin) -> str:
    """The folder's full URL (an absolute path for a local one), as records name it: the same folder
    whatever the directory a command ran in and however its path was written."""
    return storage.redact(storage.full_url(output.fs, output.root))


def _check_destination(dst: OutputAdmin, source: Source, target: Target) -> None:
    """DST is empty, or an earlier convert of SRC into these settings (to resume). An output made with
    other settings is refused as a run refuses it; one with these settings that is not a convert of
    SRC too, since converting into it would mix two outputs."""
    found, damage = dst.load_manifest()
    if damage:
        raise DamagedRecord(f"{dst.url}/{damage}: pass --overwrite to start afresh, or choose another --to")
    if found is None:
        if dst.done_ids() or dst.part_files():
            raise OutputError(f"{dst.url} holds parts or done-markers but no manifest, so no convert wrote them: "
                              "pass --overwrite to start afresh, or choose another --to")
        return
    differences = diff_fingerprints(with_defaults(found.get("fingerprint") or {}), target.fingerprint())
    if differences:
        raise FingerprintMismatch(f"{dst.url} holds vectors made with other settings ({'; '.join(differences)}); "
                                  "rerun with the original settings, pass --overwrite to start afresh, or choose "
                                  "another --to")
    origin = (found.get("converted_from") or {}).get("output")
    if origin != _where(source.output):
        made = f"converted from {origin}" if origin else "written by `docembed run`"
        raise OutputError(f"{dst.url} holds an output {made}, not a convert of {_where(source.output)}: "
                          "converting into it would mix two outputs; pass --overwrite to start afresh, or choose "
                          "another --to")


def _origin_of(marker: dict) -> dict:
    """What a DST marker records of the SRC commit it was converted from: the same commit has the
    same run, time and files."""
    return {"run_id": marker.get("run_id"), "committed_at": marker.get("committed_at"), "files": files_of(marker)}


def _tidy(dst: OutputAdmin, source: Source) -> dict[str, dict]:
    """Before converting, as a run tidies its output: units whose files are not as committed, or that
    were converted from a commit SRC no longer holds, are taken back, and what no marker names is
    removed. Returns the markers of the units already converted."""
    markers, damage = repair.find(dst)
    for damaged in damage:
        dst.remove_unit(damaged.marker or {"unit_id": damaged.unit_id})  # what no marker names goes below
    current = {m["unit_id"]: _origin_of(m) for m in source.markers}
    for unit_id, marker in list(markers.items()):
        if current.get(unit_id) != marker.get("converted_from"):
            dst.remove_unit(marker)
            del markers[unit_id]
    dst.clean_leftovers(markers)
    return markers


def _started_manifest(source: Source, target: Target, run_id: str) -> dict:
    """DST's manifest while converting: SRC's start record (inputs, plan, columns, model) with this
    convert's run, DST's fingerprint, and where DST comes from."""
    found = source.manifest
    model = {**(found.get("model") or {}), "dim": target.dim}
    return {**{k: v for k, v in found.items() if k not in _ENDING}, "status": "running", "run_id": run_id,
            "started_at": time.time(), "fingerprint": target.fingerprint(), "model": model,
            "converted_from": {"output": _where(source.output), "run_id": found.get("run_id"),
                               "finished_at": found.get("finished_at"), "output_dtype": "float32",
                               "dim": int(target.source["dim"])}}


def _completed_manifest(dst: OutputAdmin, source: Source, record: dict, markers: dict[str, dict]) -> dict:
    """DST's manifest as a run completes its own: SRC's counts, parts and rejections (DST's units are
    SRC's, one for one: checked), DST's numerics, calibration and canaries."""
    listed = set(source.manifest.get("parts", [])) | {p for u in source.manifest.get("units_from_other_inputs", [])
                                                      for p in u.get("parts", [])}
    held = {name for m in markers.values() for name in parts_of(m)}
    if held != listed:
        raise OutputError(f"{dst.url}: the converted units hold {plural(len(held), 'part')}, {source.output.url}'s "
                          f"manifest lists {plural(len(listed), 'part')}; `docembed verify --output "
                          f"{source.output.url}` says what is wrong")
    ending = {"numerics": dst.read_numerics(), "quantization": dst.read_quantization(), "canaries": dst.read_canaries()}
    return {**record, "status": "complete", "finished_at": time.time(),
            **{k: source.manifest[k] for k in _COUNTED if k in source.manifest},
            **{k: v for k, v in ending.items() if v or k == "numerics"}}


def _pin(dst: OutputAdmin, source: Source, target: Target) -> None:
    """Before the first unit, as a run's first commit does: DST's numerics are SRC's and its canaries
    SRC's, cut like the vectors (pinned by exclusive create; an earlier convert's are checked)."""
    if source.numerics:
        dst.check_numerics(source.numerics)
    if source.canaries:
        dst.check_canaries(_shrunk_canaries(source.canaries, target), CANARY_THRESHOLD)


def _shrunk_canaries(record: dict, target: Target) -> dict:
    """SRC's canary record with each vector cut as ``target`` cuts the output's vectors."""
    if not target.truncate_dim:
        return record
    cut = {name: None if packed is None else vectors.pack(target.shrink(vectors.unpack(packed)[None, :])[0])
           for name, packed in record["vectors"].items()}
    return {**record, "vectors": cut}


def _convert_unit(source: Source, dst: OutputAdmin, marker: dict, target: Target, run_id: str, check_lock) -> dict:
    """One SRC unit into DST: its parts converted (the unit's own, then those of retried rejections,
    in the order they were committed), its rejections copied, then its marker, last."""
    sizes, floats = {}, []
    for name in parts_of(marker):
        table, shrunk = _convert_part(source.output, dst, name, target)
        data = parquet_bytes(table)
        dst.publish(name, data)
        sizes[name], floats = len(data), [*floats, shrunk]
    if marker.get("rejects"):
        with source.output.open(marker["rejects"]) as handle:
            dst.publish(marker["rejects"], handle.read())
    check_lock()  # as a commit checks its run's lock before the marker
    record = {**marker, "run_id": run_id, "committed_at": time.time(), "converted_from": _origin_of(marker)}
    if marker.get("part"):
        record["part_bytes"] = sizes[marker["part"]]
    if marker.get("retry_parts"):
        record["retry_parts"] = [{**p, "bytes": sizes[p["name"]]} for p in marker["retry_parts"]]
    rows = np.concatenate(floats) if floats else np.zeros((0, target.dim), np.float32)
    if target.truncate_dim and len(rows) and isinstance(marker.get("quality"), dict):
        record["quality"] = _with_vectors(marker["quality"], rows)
    dst.mark_done(marker["unit_id"], record)
    return record


def _convert_part(src: OutputAdmin, dst: OutputAdmin, name: str, target: Target) -> tuple[pa.Table, np.ndarray]:
    """(SRC's part ``name`` with its ``embedding`` column in DST's dtype and dimensions and DST's
    fingerprint in its metadata, the float vectors that column was made from). The first part with
    rows pins DST's int8/uint8 calibration from its own vectors (``UnitStore.quantization_ranges``);
    a part without rows (a unit whose every row was rejected) pins nothing."""
    table = src.read_part(name)
    width = table.schema.field("embedding").type.list_size
    floats = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, width)
    shrunk = target.shrink(floats)
    if len(shrunk):
        ranges = dst.quantization_ranges(target.dtype, shrunk) if target.dtype in vectors.CALIBRATED else None
        column = vectors.column(shrunk, target.dtype, target.dim, ranges)
    else:
        column = pa.array([], vectors.arrow_type(target.dtype, target.dim))
    table = table.set_column(table.schema.get_field_index("embedding"), "embedding", column)
    metadata = {**(table.schema.metadata or {}), FINGERPRINT_KEY: json.dumps(target.fingerprint(), sort_keys=True)}
    return table.replace_schema_metadata(metadata), shrunk


def _with_vectors(record: dict, floats: np.ndarray) -> dict:
    """A unit's quality statistics with the vector ones (mean vector, mean square) of ``floats``."""
    mine = quality.unit_stats(np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0), floats)
    return {**record, "mean": mine["mean"], "square": mine["square"]}


def _part_bytes(markers) -> int:
    """Bytes of the parts the done-markers name, as they recorded them."""
    return sum(files_of(m).get(name) or 0 for m in markers for name in parts_of(m))


def _summarize(source: Source, dst: OutputAdmin, target: Target, todo: list[dict], done: dict[str, dict],
               run_id: str, seconds: float) -> dict:
    return {"source": source.output.url, "output": dst.url, "run_id": run_id, "output_dtype": target.dtype,
            "dim": target.dim, "source_dim": int(target.source["dim"]), "units_converted": len(todo),
            "units_skipped": len(source.markers) - len(todo), "units_total": len(source.markers),
            "rows": sum(m.get("rows", m["embedded"]) for m in done.values()),
            "bytes_before": _part_bytes(source.markers), "bytes_after": _part_bytes(done.values()), "seconds": seconds}


def format_conversion(s: dict) -> str:
    """The summary ``docembed convert`` prints."""
    cut = f" (of {s['source_dim']})" if s["dim"] != s["source_dim"] else ""
    ratio = f" ({s['bytes_after'] / s['bytes_before']:.2f}x)" if s["bytes_before"] else ""
    return "\n".join([
        f"converted  {s['source']} -> {s['output']}: {s['output_dtype']}, {s['dim']} dimensions{cut}",
        (f"units      {s['units_converted']} converted now, {s['units_skipped']} already done, {s['units_total']} "
         f"in all; {plural(s['rows'], 'row')}"),
        f"parts      {s['bytes_before'] / 1e6:.2f} MB -> {s['bytes_after'] / 1e6:.2f} MB{ratio}",
        f"run        {s['run_id']}, {s['seconds']:.1f}s",
    ])


def convert_parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(
        prog="docembed convert",
        description="Write a float32 output again in another dtype or with fewer (Matryoshka) dimensions, without "
                    "re-embedding; rerun the same command to resume.")
    found.add_argument("--output", required=True, metavar="SRC",
                       help="the float32 output to convert (the --output of a completed `docembed run`)")
    found.add_argument("--to", required=True, metavar="DST", help="the folder to write the converted output to")
    found.add_argument("--output-dtype", default="float32", choices=vectors.OUTPUT_DTYPES,
                       help="how DST stores the vectors, as `docembed run --output-dtype` (default float32, with "
                            "--truncate-dim)")
    found.add_argument("--truncate-dim", type=int, default=None, metavar="N",
                       help="keep the first N dimensions (fewer than SRC's), re-normalised where SRC's vectors are, "
                            "as `docembed run --truncate-dim N`")
    found.add_argument("--overwrite", action="store_true", help="delete what DST holds and start afresh")
    return found


def convert_command(argv: list[str]) -> int:
    """``docembed convert``: prints the summary and returns the exit code (0: DST is complete); errors
    raise docembed's own, which the CLI prints on one line with their exit code."""
    args = convert_parser().parse_args(argv)
    summary = convert(args.output, args.to, args.output_dtype, args.truncate_dim, args.overwrite)
    print(storage.redact_text(format_conversion(summary)))
    return 0
