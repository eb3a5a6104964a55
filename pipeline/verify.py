"""Verify: check an output dataset against its manifest, and against the input when given.

Checks row counts, missing and duplicated ids (with ``--long-docs chunks``: chunk indices 0..n-1 per
id, with neither gaps nor repeats), rows rejected as ``duplicate_id`` whose id no part holds (lost
rows), part files that no done-marker claims, the embedding dimension, NaN/inf values, unit norms
(when normalisation is on), that every part file is listed and present, that fingerprints agree, and
that every part was made at the output's device and precision. With ``canaries`` (the CLI's default),
it also loads the output's model in this environment, at the output's device and precision unless
others are asked for, re-embeds the canary texts pinned in ``_canaries.json`` and reports each one's
cosine to the pinned vector: below the threshold, appending to the output from here would be refused.
Returns every problem found; the CLI exits 0 only when there are none.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import repair
from pipeline.output import OutputAdmin
from pipeline.plan import describe_outside, expand_input, outside_plan
from transforms import canaries as canaries_mod, numerics, storage
from transforms.checkpoint import parts_of
from transforms.commit import CHUNK_COLUMNS, FINGERPRINT_KEY, NUMERICS_KEY
from transforms.vectors import arrow_type as vector_type
from transforms.dedup import read_ids
from transforms.errors import DamagedRecord, ModelError, OutputError
from transforms.model_ref import ModelRef
from transforms.records import with_defaults

FLOAT16_NORM_TOLERANCE = 5e-3  # float16 keeps about 3 significant digits per value
NORM_TOLERANCE = 1e-3
EXAMPLES = 5


@dataclasses.dataclass
class Report:
    rows: int = 0
    parts: int = 0
    rejected: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # true of the output, and not a fault of it
    canaries: dict = dataclasses.field(default_factory=dict)  # {name: cosine or None} re-embedded here
    canaries_made_at: str = ""  # this environment's numerics, as the canaries were re-embedded


def verify(output_url: str, input_url: str | None = None, canaries: bool = True, device: str = "auto",
           precision: str = "auto", threshold: float = canaries_mod.THRESHOLD) -> Report:
    """Every problem of the output; with ``canaries``, the canary texts re-embedded here at ``device``
    and ``precision`` (``auto``: the output's) and compared with the pinned vectors at ``threshold``."""
    output = OutputAdmin(output_url)
    manifest = output.read_manifest()
    if manifest is None:
        raise OutputError(f"{output_url} has no _manifest.json: it is not a docembed output")
    report = Report()
    if manifest.get("status") != "complete":
        report.problems.append("the last run into this output did not complete (_manifest.json status "
                               f"{manifest.get('status')!r}); rerun it to finish")
    markers, damage = repair.find(output)
    report.problems += [f"{d.describe()}; rerun to redo it" for d in damage]
    outside = outside_plan(markers, {i["url"] for i in manifest.get("inputs", [])})
    report.notes += [f"{describe_outside(g)} stay in the output" + ("; `docembed run --prune-removed` deletes them"
                                                                    if g["gone"] else "") for g in outside]
    ids, chunks = _check_parts(output, manifest, markers, report)
    rejects = output.read_rejects(markers)
    report.rejected = rejects.num_rows
    _check_counts(manifest, report)
    if chunks is not None:
        ids = _check_chunks(ids, chunks, report)
    _check_duplicates(ids, report)
    _check_lost_repeats(ids, rejects, report)
    if input_url:
        _check_against_input(input_url, manifest, ids, rejects, report, outside)
    if canaries:
        _check_canaries(output, manifest, report, device, precision, threshold)
    return report


def _check_canaries(output: OutputAdmin, manifest: dict, report: Report, device: str, precision: str,
                    threshold: float) -> None:
    """Re-embed the pinned canaries in this environment and compare (``canaries.verdict``). Canaries
    that cannot be checked here are a problem: verify is how an environment proves itself."""
    try:
        pinned = output.read_canaries()
    except DamagedRecord as exc:
        report.problems.append(f"canaries: {exc}")
        return
    if pinned is None:
        report.notes.append("no canaries pinned (no unit committed yet, or an output made before docembed pinned "
                            "them): the next commit pins them")
        return
    made = pinned.get("numerics") or {}
    device, precision = (made.get("device", "auto") if device == "auto" else device,
                         made.get("precision", "auto") if precision == "auto" else precision)
    try:
        here = numerics.resolve(device, precision)
        embedder = load_model(_model_ref(manifest), here["device"], here["precision"],
                              **_model_settings(with_defaults(manifest["fingerprint"])))
        mine = {**canaries_mod.probe(embedder, pinned["texts"]), "numerics": here}
    except Exception as exc:  # noqa: BLE001 - whatever stops the model here, the canaries are unchecked
        report.problems.append(f"canaries not checked: {' '.join(str(exc).split())[:600]}; pass a --device and "
                               "--precision this machine can run, or --no-canaries")
        return
    report.canaries = canaries_mod.cosines(pinned, mine)
    report.canaries_made_at = numerics.describe(here)
    _, problem = canaries_mod.verdict(pinned, mine, threshold)
    if problem:
        report.problems.append(f"canaries: {problem}. A run appending to this output from here would be refused")


def _model_ref(manifest: dict) -> ModelRef:
    model = manifest.get("model") or {}
    fingerprint = manifest["fingerprint"]
    if model.get("source") in ("store", "local") and not model.get("location"):
        raise ModelError("the manifest does not say where the model's files are (written before docembed recorded "
                         "it): rerun into the output once to record it")
    return ModelRef(fingerprint["model"], model.get("source", "hub"), fingerprint["model_revision"],
                    model.get("location", ""))


def _model_settings(fingerprint: dict) -> dict:
    return {"normalize": fingerprint["normalize"], "max_seq_length": fingerprint["max_seq_length"],
            "prefix": fingerprint["prefix"], "truncate_dim": fingerprint["truncate_dim"],
            "trust_remote_code": fingerprint["trust_remote_code"]}


@functools.lru_cache(maxsize=1)
def load_model(ref: ModelRef, device: str, precision: str, **settings):
    """The output's model in this environment (the last one asked for is kept: verifying outputs of
    one model one after another loads it once)."""
    from transforms.model import Embedder
    from transforms.model_ref import materialize

    return Embedder(materialize(ref), device, precision, **settings)


def _check_parts(output: OutputAdmin, manifest: dict, markers: dict, report: Report) -> tuple[list[str], list | None]:
    """Every part's ids, and with ``--long-docs chunks`` each row's chunk index (else None)."""
    elsewhere = {p for u in manifest.get("units_from_other_inputs", [])
                 for p in u.get("parts", [u["part"]] if u.get("part") else [])}
    listed, present = set(manifest.get("parts", [])) | elsewhere, set(output.part_files())
    claimed = {name for marker in markers.values() for name in parts_of(marker)}
    for name in sorted(listed - present):
        report.problems.append(f"part {name} is listed in the manifest but missing")
    for name in sorted(present - claimed):
        report.problems.append(f"part {name} is claimed by no done-marker (a commit interrupted before its marker, "
                               "or a file docembed did not write); the next `docembed run` into the output removes it")
    for name in sorted((present & claimed) - listed):
        report.problems.append(f"part {name} is present but not listed in the manifest")
    chunked = with_defaults(manifest["fingerprint"])["long_docs"] == "chunks"
    ids: list[str] = []
    chunks: list[int] | None = [] if chunked else None
    for name in sorted(present):
        table = _check_part(output, name, manifest, report)
        ids += table.column("id").to_pylist()
        if chunked:
            chunks += _chunk_column(table, name, report)
    return ids, chunks


def _check_part(output: OutputAdmin, name: str, manifest: dict, report: Report) -> pa.Table:
    fingerprint = with_defaults(manifest["fingerprint"])
    table = output.read_part(name)
    report.parts += 1
    report.rows += table.num_rows if name in manifest.get("parts", []) else 0
    metadata = table.schema.metadata or {}
    stored = metadata.get(FINGERPRINT_KEY)
    if stored is None or with_defaults(json.loads(stored)) != fingerprint:
        report.problems.append(f"part {name}: its fingerprint differs from the manifest's")
    made_at, pinned = json.loads(metadata.get(NUMERICS_KEY, b"{}")), output.read_numerics()
    if made_at and pinned and not numerics.same(made_at, pinned):
        report.problems.append(f"part {name}: made at {numerics.describe(made_at)}, but the output's vectors "
                               f"are {numerics.describe(pinned)}")
    kind = table.schema.field("embedding").type if "embedding" in table.schema.names else None
    dtype = fingerprint.get("output_dtype", "float32")
    expected = vector_type(dtype, fingerprint["dim"])
    if not (pa.types.is_fixed_size_list(kind) and (kind.list_size, kind.value_type) == (expected.list_size,
                                                                                       expected.value_type)):
        report.problems.append(f"part {name}: embedding type {kind}, expected {expected}")
        return table
    if dtype not in ("float32", "float16"):
        return table  # quantized: any stored value is a bucket or a bit pattern
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, kind.list_size)
    vectors = vectors.astype(np.float32)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        report.problems.append(f"part {name}: {int(bad.sum())} embeddings hold NaN or inf")
    if fingerprint.get("normalize"):
        tolerance = NORM_TOLERANCE if dtype == "float32" else FLOAT16_NORM_TOLERANCE
        off = np.abs(np.linalg.norm(vectors, axis=1) - 1.0) > tolerance
        if (off & ~bad).any():
            report.problems.append(f"part {name}: {int((off & ~bad).sum())} embeddings are not unit length")
    return table


def _chunk_column(table: pa.Table, name: str, report: Report) -> list:
    missing = [c for c in CHUNK_COLUMNS if c not in table.column_names]
    if missing:
        report.problems.append(f"part {name}: no {', '.join(missing)} column, but the output was written "
                               "with --long-docs chunks")
        return [None] * table.num_rows
    starts, ends = (table.column(c).to_numpy() for c in ("char_start", "char_end"))
    if (ends < starts).any() or (starts < 0).any():
        report.problems.append(f"part {name}: {int(((ends < starts) | (starts < 0)).sum())} chunks have "
                               "char_end before char_start or a negative offset")
    return table.column("chunk").to_pylist()


def _check_chunks(ids: list[str], chunks: list, report: Report) -> list[str]:
    """Each id's chunk indices must be exactly 0..n-1: a gap means a lost window, a repeat a window
    written twice. Returns the ids once per document (its chunk 0), for the document-level checks."""
    by_id: dict[str, list] = collections.defaultdict(list)
    for ident, k in zip(ids, chunks):
        by_id[ident].append(k)
    repeated = sorted(i for i, ks in by_id.items() if len(set(ks)) < len(ks))
    gaps = sorted(i for i, ks in by_id.items() if set(ks) != set(range(max(ks, default=-1) + 1)))
    if repeated:
        report.problems.append(f"{len(repeated)} ids have a chunk index more than once, e.g. {repeated[:EXAMPLES]}")
    if gaps:
        report.problems.append(f"{len(gaps)} ids have gaps in their chunk indices (each should have 0..n-1), "
                               f"e.g. {gaps[:EXAMPLES]}")
    return [i for i, k in zip(ids, chunks) if k == 0]


def _check_counts(manifest: dict, report: Report) -> None:
    counts = manifest.get("counts")
    if not counts:
        return
    rows = counts.get("rows", counts["embedded"])
    if report.rows != rows:
        report.problems.append(f"{report.rows} rows in the listed parts, the manifest counts {rows}")
    if report.rejected != counts["rejected"]:
        report.problems.append(f"{report.rejected} rejected rows in _rejects/, the manifest counts {counts['rejected']}")
    if counts["embedded"] + counts["rejected"] != counts["input_rows"]:
        report.problems.append(f"the manifest's embedded {counts['embedded']} + rejected {counts['rejected']} "
                               f"!= its input rows {counts['input_rows']}")


def _check_lost_repeats(ids: list[str], rejects: pa.Table, report: Report) -> None:
    """Rows rejected as ``duplicate_id`` must repeat an id the output holds: one whose id no part holds
    was lost (its first occurrence is gone)."""
    repeats = rejects.filter(pc.equal(rejects.column("reason"), "duplicate_id"))
    held = set(ids)
    lost = [(s, r, i) for i, s, r in zip(*(repeats.column(c).to_pylist() for c in ("id", "source", "row_index")))
            if i not in held]
    if lost:
        examples = "; ".join(f"id {i!r} at {s} row {r}" for s, r, i in sorted(lost)[:EXAMPLES])
        report.problems.append(f"{len(lost)} rows rejected as duplicate_id have no row with their id in the output "
                               f"(lost rows: {examples}); `docembed run` with --retry-rejects duplicate_id embeds them")


def _check_duplicates(ids: list[str], report: Report) -> None:
    repeated = [i for i, n in collections.Counter(ids).items() if n > 1]
    if repeated:
        report.problems.append(f"{len(repeated)} ids appear more than once, e.g. {repeated[:EXAMPLES]}")


def _check_against_input(input_url: str, manifest: dict, ids: list[str], rejects: pa.Table,
                         report: Report, outside: list[dict]) -> None:
    id_column = manifest["settings"]["id_column"]
    rejected_rows = set(zip(rejects.column("source").to_pylist(), rejects.column("row_index").to_pylist()))
    expected: collections.Counter = collections.Counter()
    for url in expand_input(input_url):
        file_ids = read_ids(url, id_column, skip_bad_files=True).to_pylist()
        source = storage.redact(url)  # as rejections name it
        expected.update(i for row, i in enumerate(file_ids) if (source, row) not in rejected_rows)
    got = collections.Counter(ids)
    missing, unexpected = expected - got, got - expected
    if missing:
        report.problems.append(f"{sum(missing.values())} input ids are neither embedded nor rejected, "
                               f"e.g. {sorted(missing)[:EXAMPLES]}")
    if unexpected:
        why = f" ({sum(g['rows'] for g in outside)} rows come from files no longer in the input, above)" if outside else ""
        report.problems.append(f"{sum(unexpected.values())} embedded ids are not in the input (or not "
                               f"once){why}, e.g. {sorted(unexpected)[:EXAMPLES]}")


def format_report(output_url: str, report: Report) -> str:
    head = (f"verify {output_url}: {report.rows} rows in {report.parts} parts, "
            f"{report.rejected} rejected rows")
    notes = [f"  note: {n}" for n in report.notes]
    if report.canaries:
        scored = sorted(((c, n) for n, c in report.canaries.items() if c is not None))
        failed = [n for n, c in report.canaries.items() if c is None]
        notes.insert(0, f"  canaries: {len(scored)} re-embedded at {report.canaries_made_at}; cosine to the pinned "
                        f"vectors: " + ", ".join(f"{n} {c:.6f}" for c, n in scored)
                     + (f"; the model failed on {', '.join(failed)}" if failed else ""))
    if not report.problems:
        return "\n".join([f"{head}: OK", *notes])
    return "\n".join([f"{head}: {len(report.problems)} problems"] + [f"  - {p}" for p in report.problems] + notes)
