"""Verify: check an output dataset against its manifest, and against the input when given.

Checks row counts, missing and duplicated ids (with ``--long-docs chunks``: chunk indices 0..n-1 per
id, with neither gaps nor repeats), rows rejected as ``duplicate_id`` whose id no part holds (lost
rows), part files that no done-marker claims, the embedding dimension, NaN/inf values, unit norms
(when normalisation is on), that every part file is listed and present, that fingerprints agree, and
that every part was made at the output's device and precision. With the input, also that each unit's
texts are still those its vectors were made from (the digest its done-marker recorded,
``docembed.transforms.digest``). While a run holds the output's live lock (``lock.lock_state``), it checks what
is committed (the units with done-markers, and their parts) and says a run is in progress; the
manifest, which that run completes at its end, is not held against it. With ``canaries`` (the CLI's default),
it also loads the output's model in this environment, at the output's device and precision unless
others are asked for, re-embeds the canary texts pinned in ``_canaries.json`` and reports each one's
cosine to the pinned vector: below the threshold, appending to the output from here would be refused.
Returns every problem found; the CLI exits 0 only when there are none.
"""

from __future__ import annotations

import collections
import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from docembed.pipeline.admin import repair
from docembed.pipeline.lock import lock_state
from docembed.store.admin import OutputAdmin
from docembed.pipeline.plan import describe_outside, expand_input, outside_plan
from docembed.pipeline.admin.status import run_state
from docembed.model import canaries as canaries_mod, numerics
from docembed.store import storage
from docembed.store.layout import CHUNK_COLUMNS, FINGERPRINT_KEY, NUMERICS_KEY, parts_of
from docembed.transforms.digest import texts_digest
from docembed.transforms.read import read_rows
from docembed.vectors import arrow_type as vector_type
from docembed.transforms.dedup import read_ids
from docembed.errors import DamagedRecord, OutputError
from docembed.use.recipe import load_model, model_ref, model_settings
from docembed.records import WorkUnit, with_defaults
from docembed.text import agree, plural

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
    markers, damage = repair.find(output)
    live = _check_run(output, manifest, markers, report)
    report.problems += [f"{d.describe()}; rerun to redo it" for d in damage]
    outside = outside_plan(markers, {i["url"] for i in manifest.get("inputs", [])})
    report.notes += [f"{describe_outside(g)} stay in the output" + ("; `docembed run --prune-removed` deletes them"
                                                                    if g["gone"] else "") for g in outside]
    ids, chunks = _check_parts(output, manifest, markers, report, live)
    rejects = output.read_rejects(markers)
    report.rejected = rejects.num_rows
    if not live:  # a live run's manifest is its start's (or, a moment after it took the lock, the last run's)
        _check_counts(manifest, report)
    if chunks is not None:
        ids = _check_chunks(ids, chunks, report)
    _check_duplicates(ids, report)
    _check_lost_repeats(ids, rejects, report)
    if input_url:
        urls = expand_input(input_url)  # listed once, for both checks
        _check_against_input(urls, manifest, ids, rejects, report, outside, markers if live else None)
        _check_texts(urls, manifest, markers, report)
    if canaries:
        _check_canaries(output, manifest, report, device, precision, threshold)
    return report


def _check_run(output: OutputAdmin, manifest: dict, markers: dict, report: Report) -> bool:
    """Whether a run is in progress (a live lock: a note, and what it committed is checked); otherwise
    a last run that did not complete is a problem, saying how it ended (``status.run_state``)."""
    lock = lock_state(output)
    run = run_state(manifest, lock, markers, (manifest.get("plan") or {}).get("units"))
    if run["live"]:
        report.notes.append(f"a run is in progress ({lock['holder']}): checked the {plural(len(markers), 'unit')} "
                            "it has committed so far, not the manifest it completes at its end")
    elif run["state"] != "complete":
        report.problems.append(f"the last run into this output did not complete: {run['line']}")
    return run["live"]


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
        embedder = load_model(model_ref(manifest), here["device"], here["precision"],
                              **model_settings(with_defaults(manifest["fingerprint"])))
        mine = {**canaries_mod.probe(embedder, pinned["texts"]), "numerics": here}
    except Exception as exc:  # noqa: BLE001 - whatever stops the model here, the canaries are unchecked
        report.problems.append(f"canaries not checked: {' '.join(str(exc).split())[:600]}; pass a --device and "
                               "--precision this machine can run, or --no-canaries")
        return
    report.canaries = canaries_mod.cosines(pinned, mine)
    report.canaries_made_at = numerics.describe_numerics(here)
    _, problem = canaries_mod.verdict(pinned, mine, threshold)
    if problem:
        report.problems.append(f"canaries: {problem}. A run appending to this output from here would be refused")


def _check_parts(output: OutputAdmin, manifest: dict, markers: dict, report: Report,
                 live: bool = False) -> tuple[list[str], list | None]:
    """Every part's ids, and with ``--long-docs chunks`` each row's chunk index (else None). Only a
    completed manifest lists parts; during a live run only the parts done-markers claim are checked
    (one published a moment before its marker is a commit in flight, not a stray file), and not
    against the manifest, which the run completes at its end."""
    present, claimed = set(output.part_files()), {name for marker in markers.values() for name in parts_of(marker)}
    if live:
        in_flight, present = present - claimed, present & claimed
        report.notes += [f"{plural(len(in_flight), 'part')} not yet claimed by a done-marker (commits in flight) "
                         f"{agree(len(in_flight), 'was', 'were')} left out"] if in_flight else []
    else:
        _check_listing(manifest, present, claimed, report)
    counted = set(manifest["parts"]) if "parts" in manifest and not live else claimed
    chunked = with_defaults(manifest["fingerprint"])["long_docs"] == "chunks"
    ids: list[str] = []
    chunks: list[int] | None = [] if chunked else None
    for name in sorted(present):
        try:
            table = _check_part(output, name, manifest, report, name in counted)
        except FileNotFoundError:
            if not live:
                raise
            continue  # taken back by the running run (its input file changed) since it was listed
        ids += table.column("id").to_pylist()
        if chunked:
            chunks += _chunk_column(table, name, report)
    return ids, chunks


def _check_listing(manifest: dict, present: set[str], claimed: set[str], report: Report) -> None:
    """Parts against the done-markers, and against the manifest's list where it has one (a run lists
    its parts as it completes: a run that stopped short, or is going, has listed none)."""
    for name in sorted(present - claimed):
        report.problems.append(f"part {name} is claimed by no done-marker (a commit interrupted before its marker, "
                               "or a file docembed did not write); the next `docembed run` into the output removes it")
    if "parts" not in manifest:
        return
    elsewhere = {p for u in manifest.get("units_from_other_inputs", [])
                 for p in u.get("parts", [u["part"]] if u.get("part") else [])}
    listed = set(manifest["parts"]) | elsewhere
    for name in sorted(listed - present):
        report.problems.append(f"part {name} is listed in the manifest but missing")
    for name in sorted((present & claimed) - listed):
        report.problems.append(f"part {name} is present but not listed in the manifest")


def _check_part(output: OutputAdmin, name: str, manifest: dict, report: Report, counted: bool = True) -> pa.Table:
    """One part's fingerprint, numerics, vector type, finiteness and norms; ``counted``: its rows count
    towards ``report.rows`` (the rows the manifest's counts are compared with)."""
    fingerprint = with_defaults(manifest["fingerprint"])
    table = output.read_part(name)
    report.parts += 1
    report.rows += table.num_rows if counted else 0
    metadata = table.schema.metadata or {}
    stored = metadata.get(FINGERPRINT_KEY)
    if stored is None or with_defaults(json.loads(stored)) != fingerprint:
        report.problems.append(f"part {name}: its fingerprint differs from the manifest's")
    made_at, pinned = json.loads(metadata.get(NUMERICS_KEY, b"{}")), output.read_numerics()
    if made_at and pinned and not numerics.same(made_at, pinned):
        report.problems.append(f"part {name}: made at {numerics.describe_numerics(made_at)}, but the output's vectors "
                               f"are {numerics.describe_numerics(pinned)}")
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
        report.problems.append(f"{plural(len(repeated), 'id')} {agree(len(repeated), 'has', 'have')} a chunk index more than once, "
                               f"e.g. {repeated[:EXAMPLES]}")
    if gaps:
        report.problems.append(f"{plural(len(gaps), 'id')} {agree(len(gaps), 'has', 'have')} gaps in {agree(len(gaps), 'its', 'their')} "
                               f"chunk indices (each should have 0..n-1), e.g. {gaps[:EXAMPLES]}")
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
        n = len(lost)
        report.problems.append(f"{plural(n, 'row')} rejected as duplicate_id {agree(n, 'has', 'have')} no row with "
                               f"{agree(n, 'its', 'their')} id in the output (lost {agree(n, 'row', 'rows')}: "
                               f"{examples}); `docembed run` with --retry-rejects duplicate_id embeds "
                               f"{agree(n, 'it', 'them')}")


def _check_duplicates(ids: list[str], report: Report) -> None:
    repeated = [i for i, n in collections.Counter(ids).items() if n > 1]
    if repeated:
        report.problems.append(f"{plural(len(repeated), 'id')} {agree(len(repeated), 'appears', 'appear')} more "
                               f"than once, e.g. {repeated[:EXAMPLES]}")


def _check_against_input(urls: list[str], manifest: dict, ids: list[str], rejects: pa.Table,
                         report: Report, outside: list[dict], committed: dict | None = None) -> None:
    """Every row of the input files ``urls`` embedded or rejected, once. ``committed``: during a live run, its markers: only
    the rows of committed units are expected yet."""
    id_column = manifest["settings"]["id_column"]
    rejected_rows = set(zip(rejects.column("source").to_pylist(), rejects.column("row_index").to_pylist()))
    expected: collections.Counter = collections.Counter()
    for url in urls:
        file_ids = read_ids(url, id_column, skip_bad_files=True).to_pylist()
        source = storage.redact(url)  # as rejections name it
        done = _rows_done(committed, source) if committed is not None else None
        expected.update(i for row, i in enumerate(file_ids) if (source, row) not in rejected_rows
                        and (done is None or row in done))
    got = collections.Counter(ids)
    missing, unexpected = expected - got, got - expected
    if missing:
        count = sum(missing.values())
        report.problems.append(f"{plural(count, 'input id')} {agree(count, 'is', 'are')} neither embedded nor "
                               f"rejected, e.g. {sorted(missing)[:EXAMPLES]}")
    if unexpected:
        rows, count = sum(g["rows"] for g in outside), sum(unexpected.values())
        why = (f" ({plural(rows, 'row')} {agree(rows, 'comes', 'come')} from files no longer in the input, above)"
               if outside else "")
        report.problems.append(f"{plural(count, 'embedded id')} {agree(count, 'is', 'are')} not in the input (or "
                               f"not once){why}, e.g. {sorted(unexpected)[:EXAMPLES]}")


def _rows_done(markers: dict, source: str) -> set[int]:
    """The rows of ``source`` that committed units hold."""
    return {row for m in markers.values() if m["source"] == source for row in range(m["row_start"], m["row_end"])}


TEXTS_CHANGED = "texts changed since they were embedded: their vectors belong to the old texts; rerun to re-embed"


def _check_texts(urls: list[str], manifest: dict, markers: dict, report: Report) -> None:
    """Each committed unit of the input files ``urls``: its texts read again (the unit's rows of the text column,
    all of them, rejected ones too) against the digest its done-marker recorded. A file rewritten in
    place with other texts keeps its size and time, and shows here. Markers written before markers
    recorded the digest are counted in one note."""
    text_column, unchecked = manifest["settings"]["text_column"], 0
    for url in urls:
        source = storage.redact(url)  # as markers name it
        mine = sorted((m for m in markers.values() if m["source"] == source), key=lambda m: m["row_start"])
        unchecked += sum(1 for m in mine if not m.get("text_digest"))
        changed = [_texts_differ(url, m, text_column) for m in mine if m.get("text_digest")]
        changed = [c for c in changed if c]
        if changed:
            more = f" and {plural(len(changed) - EXAMPLES, 'more unit')}" if len(changed) > EXAMPLES else ""
            report.problems.append(f"{source} {', '.join(changed[:EXAMPLES])}{more}: {TEXTS_CHANGED}")
    if unchecked:
        units = plural(unchecked, "unit's", "units'")
        report.notes.append(f"{units} texts could not be checked against the input: their done-markers were "
                            "written before docembed recorded a digest of the texts")


def _texts_differ(url: str, marker: dict, text_column: str) -> str | None:
    """"rows A-B" (B exclusive) where the unit's texts now differ from those it embedded, else None."""
    rows = f"rows {marker['row_start']}-{marker['row_end']}"
    fs, path = storage.filesystem(url)
    try:
        table = read_rows(fs, path, WorkUnit.from_json(marker), [text_column])
    except (pa.ArrowException, OSError, IndexError, KeyError, ValueError) as exc:  # the file shrank or lost a column
        return f"{rows} (cannot be read as embedded: {' '.join(str(exc).split())[:200]})"
    return rows if texts_digest(table.column(text_column)) != marker["text_digest"] else None


def format_verification(output_url: str, report: Report) -> str:
    head = (f"verify {output_url}: {plural(report.rows, 'row')} in {plural(report.parts, 'part')}, "
            f"{plural(report.rejected, 'rejected row')}")
    notes = [f"  note: {n}" for n in report.notes]
    if report.canaries:
        scored = sorted(((c, n) for n, c in report.canaries.items() if c is not None))
        failed = [n for n, c in report.canaries.items() if c is None]
        notes.insert(0, f"  canaries: {len(scored)} re-embedded at {report.canaries_made_at}; cosine to the pinned "
                        f"vectors: " + ", ".join(f"{n} {c:.6f}" for c, n in scored)
                     + (f"; the model failed on {', '.join(failed)}" if failed else ""))
    if not report.problems:
        return "\n".join([f"{head}: OK", *notes])
    return "\n".join([f"{head}: {plural(len(report.problems), 'problem')}", *(f"  - {p}" for p in report.problems),
                      *notes])
