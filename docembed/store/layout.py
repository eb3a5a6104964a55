"""The output folder's format: every file name, folder and Parquet metadata key docembed writes, and
the functions that build and parse them. Every other module asks this one; it imports nothing of
docembed's, so the launcher, the workers and the tests read one definition.

An output folder::

    part-<unit_id>.parquet            the data: one part per committed work unit
    part-<unit_id>-retry-<k>.parquet  rows of the unit's rejections embedded by a later run (--retry-rejects)
    _checkpoints/<unit_id>.json       done-markers, written after the part; the source of truth; each names
                                      the files its unit holds (``files_of``)
    _attempts/                        scratch files of in-flight attempts (local disks only)
    _progress/<unit_id>.json          documents embedded so far in a unit that is running
    _rejects/<unit_id>[-retry-<k>].parquet  rows that could not be embedded, with their reasons
    _plans/<run_id>/units-N.jsonl     the running run's work units, read by the job (not in its graph)
    _plans/<run_id>/output-N.jsonl    the output's files as the run was planned: its parts and the
                                      rejections holding duplicate_id rows (what the duplicate-id check
                                      counts as there)
    _plans/<run_id>/repeats/<unit_id>.json  the unit's rows whose id repeats an earlier one
    _reports/<run_id>.json            each run's report (throughput, stages, quality, drift)
    _numerics.json                    the device and precision of the output's vectors
    _canaries.json                    the canary texts' vectors as the output's first commit made them
    _quantization.json                the int8/uint8 calibration of stored vectors (--output-dtype)
    _manifest.json                    the run's fingerprint, plan and, when complete, counts and parts
    _lock.json                        the running run's lock
    _stop                             asks workers to take no new unit (the run got SIGTERM)

Readers (pyarrow, DuckDB, pandas, Spark) skip names starting with ``_`` or ``.``, so they see only the
parts. Each part's Parquet metadata carries ``FINGERPRINT_KEY``, ``UNIT_KEY`` and ``NUMERICS_KEY``.
These names are what outputs written by earlier versions hold (tests/test_old_outputs.py keeps one):
change one and those outputs no longer resume.
"""

from __future__ import annotations

import posixpath
import uuid

import pyarrow as pa

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
RETRY = "-retry-"
CHECKPOINTS = "_checkpoints"
ATTEMPTS = "_attempts"
PROGRESS = "_progress"
REJECTS = "_rejects"
PLANS = "_plans"
REPEATS = "repeats"
REPORTS = "_reports"
NUMERICS = "_numerics.json"
CANARIES = "_canaries.json"
QUANTIZATION = "_quantization.json"
MANIFEST = "_manifest.json"
LOCK = "_lock.json"
STOP = "_stop"
PROBE_PREFIX = "_probe-"
UNITS_PER_SHARD = 5000  # records per plan shard (units-N.jsonl, output-N.jsonl)

# Keys of every part's Parquet metadata (schema-level key/value pairs).
FINGERPRINT_KEY = b"docembed.fingerprint"
UNIT_KEY = b"docembed.unit"
NUMERICS_KEY = b"docembed.numerics"
# The schema of every _rejects/*.parquet file: one row per input row that was not embedded, and why.
REJECTS_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("row_index", pa.int64()),
     ("reason", pa.string()), ("message", pa.string())]
)
# Columns a part has besides id, embedding and pass-through columns when documents are cut into chunks.
CHUNK_COLUMNS = ("chunk", "char_start", "char_end")


def part_name(unit_id: str, retry: int = 0) -> str:
    """The unit's part, or with ``retry`` the part of the rows its k-th retry of rejections embedded."""
    return f"{PART_PREFIX}{unit_id}{f'{RETRY}{retry}' if retry else ''}{PART_SUFFIX}"


def rejects_name(unit_id: str, retry: int = 0) -> str:
    return f"{REJECTS}/{unit_id}{f'{RETRY}{retry}' if retry else ''}.parquet"


def is_rejects(name: str) -> bool:
    return name.startswith(f"{REJECTS}/")


def marker_name(unit_id: str) -> str:
    return posixpath.join(CHECKPOINTS, f"{unit_id}.json")


def progress_name(unit_id: str) -> str:
    return posixpath.join(PROGRESS, f"{unit_id}.json")


def repeats_name(run_id: str, unit_id: str) -> str:
    return posixpath.join(PLANS, run_id, REPEATS, f"{unit_id}.json")


def shard_name(run_id: str, kind: str, index: int) -> str:
    """The ``index``-th shard of a run's ``kind`` records ("units" or "output")."""
    return posixpath.join(PLANS, run_id, f"{kind}-{index:05d}.jsonl")


def report_name(run_id: str) -> str:
    return posixpath.join(REPORTS, f"{run_id}.json")


def probe_name() -> str:
    """A fresh name for checking that the folder can be written."""
    return f"{PROBE_PREFIX}{uuid.uuid4().hex}"


def record_key(path: str) -> str:
    """A JSON record's key from its file name: a marker's unit id, a report's run id."""
    return posixpath.basename(path)[: -len(".json")]


def unit_id_of_part(name: str) -> str | None:
    base = posixpath.basename(name)
    if base.startswith(PART_PREFIX) and base.endswith(PART_SUFFIX):
        return base[len(PART_PREFIX) : -len(PART_SUFFIX)].split(RETRY)[0]
    return None


def files_of(marker: dict) -> dict[str, int | None]:
    """The files a done-marker says its unit holds, relative to the output folder, with the sizes it
    recorded for parts (None where it recorded none): its part, the parts of retried rejections, and
    its rejections."""
    files = {marker["part"]: marker.get("part_bytes")} if marker.get("part") else {}
    files.update({p["name"]: p.get("bytes") for p in marker.get("retry_parts", [])})
    if marker.get("rejects"):
        files[marker["rejects"]] = None
    return files


def parts_of(marker: dict) -> list[str]:
    """The part files a done-marker names: its part, and the parts of its retried rejections."""
    return [name for name in files_of(marker) if not is_rejects(name)]


_KIND_OF_FOLDER = {CHECKPOINTS: "marker", REJECTS: "rejects", PLANS: "plan", PROGRESS: "progress",
                   REPORTS: "report", ATTEMPTS: "scratch"}
_KIND_OF_FILE = {MANIFEST: "manifest", LOCK: "lock", NUMERICS: "numerics", CANARIES: "canaries",
                 QUANTIZATION: "quantization", STOP: "stop"}


def kind_of(relative: str) -> str:
    """What a name in the output folder is ("part", "marker", "lock", ...): the KIND of the fault
    points ``publish:KIND`` and ``remove:KIND`` (``store.faults``)."""
    base, top = posixpath.basename(relative), relative.split("/")[0]
    if top in _KIND_OF_FOLDER:
        return _KIND_OF_FOLDER[top]
    if base.startswith(PART_PREFIX):
        return "part"
    return _KIND_OF_FILE.get(base, "probe" if base.startswith(PROBE_PREFIX) else "other")
