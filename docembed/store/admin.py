"""Output: the launcher's administration of an output folder, on top of the workers' unit store.

Workers may only do what ``docembed.store.units.UnitStore`` offers. What only the launcher (and the
``status``, ``verify`` and ``report`` commands) does lives here: reading every done-marker, cleaning up
what interrupted attempts left, taking committed units back, the manifest, the plan shards, the lock
file, the stop request and the reports. No other module opens the folder's filesystem itself.
"""

from __future__ import annotations

import contextlib
import json
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from docembed.store.layout import (ATTEMPTS, CANARIES, CHECKPOINTS, LOCK, MANIFEST, NUMERICS, PLANS, PROGRESS, REJECTS,
                                    REJECTS_SCHEMA, REPORTS, STOP, UNITS_PER_SHARD, files_of, marker_name, parts_of,
                                    probe_name, record_key, report_name, shard_name)
from docembed.store.units import UnitStore, dumps
from docembed.errors import DamagedRecord, OutputError
from docembed.records import WorkUnit



class WriteFailed(OutputError):
    """A write or a removal in the output folder failed once the run had begun (a full, read-only or
    failing disk; an object store answering 5xx): exit 1, as a failed job. Committed units are kept."""

    exit_code = 1


@contextlib.contextmanager
def write_errors(url: str):
    """Around a run once its checks are done: an OSError raised inside (a write of the launcher's
    failed: the lock, the manifest, the plan, the stop request, the report, a removal) raised again as
    ``WriteFailed``, on one line naming the file and the cause (``storage.naming``), notes kept."""
    try:
        yield
    except OSError as exc:
        failed = WriteFailed(f"a write to --output {url} failed: {one_line(exc)}; units committed so far are kept: "
                             "fix the cause and rerun the same command to resume")
        for note in getattr(exc, "__notes__", []):
            failed.add_note(note)
        raise failed from exc


def one_line(exc: BaseException) -> str:
    """An error's message on one line; an error without a message is named by its type."""
    return " ".join(str(exc).split()) or type(exc).__name__


class OutputAdmin(UnitStore):
    """Everything the launcher reads and writes in the output folder besides a unit's commit."""

    # --- reading -------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def done_ids(self) -> set[str]:
        """Ids of committed units, from marker names alone (cheap enough to poll)."""
        return {record_key(p) for p in self._ls(self.path(CHECKPOINTS)) if p.endswith(".json")}

    def done_markers(self) -> dict[str, dict]:
        """unit_id -> marker record, for every committed unit whose marker can be read."""
        return self.read_markers()[0]

    def read_markers(self) -> tuple[dict[str, dict], dict[str, str]]:
        """(unit_id -> marker record, unit_id -> why its marker cannot be read)."""
        records, unreadable = self._read_json_dir(CHECKPOINTS)
        markers = {}
        for name, record in records.items():
            if isinstance(record, dict) and record.get("unit_id") == name:
                markers[name] = record
            else:
                unreadable[name] = "not a done-marker of this unit"
        return markers, unreadable

    def progress(self) -> dict[str, dict]:
        """unit_id -> latest progress record of units still running (or interrupted)."""
        return {name: rec for name, rec in self._read_json_dir(PROGRESS)[0].items() if isinstance(rec, dict)}

    def read_manifest(self) -> dict | None:
        """The manifest, None when there is none; DamagedRecord when it cannot be read."""
        manifest, damage = self.load_manifest()
        if damage:
            raise DamagedRecord(f"{self.url}/{damage}; rerun the same `docembed run` command, which rewrites it")
        return manifest

    def load_manifest(self) -> tuple[dict | None, str | None]:
        """(the manifest, or None when there is none or it is damaged; what is wrong with it, or None)."""
        try:
            manifest = self._read_json(self.path(MANIFEST))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return None, f"{MANIFEST} is damaged ({type(exc).__name__}: {exc})"
        if manifest is not None and not isinstance(manifest, dict):
            return None, f"{MANIFEST} is damaged (not a record)"
        return manifest, None

    def sizes(self, sub: str = "") -> dict[str, int]:
        """name -> size of the files in the folder (or in ``sub``), from one listing."""
        try:
            entries = self.fs.ls(self.path(sub) if sub else self.root, detail=True)
        except FileNotFoundError:
            return {}
        # An object store may list a folder's own placeholder object (name ending in "/"): not a file.
        return {posixpath.basename(e["name"]): int(e.get("size") or 0) for e in entries
                if e.get("type") != "directory" and not e["name"].endswith("/")}

    def part_metadata(self, name: str) -> dict:
        """A part's Parquet key-value metadata (fingerprint, unit, numerics)."""
        with self.open(name) as handle:
            return pq.ParquetFile(handle).schema_arrow.metadata or {}

    def read_part(self, name: str) -> pa.Table:
        with self.open(name) as handle:
            return pq.read_table(handle)

    def read_rejects(self, markers: dict[str, dict]) -> pa.Table:
        """The rejections the done-markers name."""
        tables = []
        for marker in markers.values():
            if marker.get("rejects"):
                with self.open(marker["rejects"]) as handle:
                    tables.append(pq.read_table(handle))
        return pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table()

    # --- the run's own records -----------------------------------------------------------
    def write_manifest(self, manifest: dict) -> None:
        self.publish(MANIFEST, dumps(manifest))

    def write_plan(self, run_id: str, units: list[WorkUnit]) -> list[str]:
        """The units to do as JSON-lines shards under ``_plans/<run_id>/``; returns their names."""
        return self._write_shards(run_id, "units", [u.to_json() for u in units])

    def write_snapshot(self, run_id: str, records: list[dict]) -> list[str]:
        """The output's files as the run is planned (``snapshot``), as JSON-lines shards under
        ``_plans/<run_id>/``; returns their names."""
        return self._write_shards(run_id, "output", records)

    def _write_shards(self, run_id: str, kind: str, records: list[dict]) -> list[str]:
        names = []
        for k in range(0, len(records), UNITS_PER_SHARD):
            name = shard_name(run_id, kind, k // UNITS_PER_SHARD)
            lines = (json.dumps(r, sort_keys=True) for r in records[k:k + UNITS_PER_SHARD])
            self.publish(name, ("\n".join(lines) + "\n").encode())
            names.append(name)
        return names

    def remove_plan(self) -> None:
        """After the job: the plan shards are done with (the lock makes them this run's only)."""
        self._remove_quietly(self.path(PLANS), recursive=True)

    def write_report(self, run_id: str, report: dict) -> str:
        name = report_name(run_id)
        self.publish(name, json.dumps(report, indent=1).encode())
        return name

    def report_names(self) -> list[str]:
        """Report files, oldest first (run ids start with a timestamp)."""
        return sorted(posixpath.basename(p) for p in self._ls(self.path(REPORTS)) if p.endswith(".json"))

    def read_report(self, name: str) -> dict:
        return self._read_json(self.path(REPORTS, name))

    def check_writable(self) -> None:
        """Raises OSError when nothing can be written under the folder."""
        probe = probe_name()
        self.publish(probe, b"")
        self.remove(probe)

    # --- the lock (docembed/pipeline/lock.py) and the stop request (docembed/pipeline/interrupt.py) ----------
    def create_lock(self, record: dict) -> bool:
        return self.create(LOCK, json.dumps(record).encode())

    def write_lock(self, record: dict) -> None:
        """The heartbeat: the lock record again, with a fresh time."""
        self.publish(LOCK, json.dumps(record).encode(), kind="heartbeat")

    def remove_lock(self) -> None:
        self.remove(LOCK)

    def request_stop(self, deadline: float) -> None:
        """Ask the workers to take no new unit, and to abandon the unit in hand at ``deadline``."""
        self.publish(STOP, json.dumps({"deadline": deadline}).encode())

    def clear_stop(self) -> None:
        self.remove(STOP)

    # --- resume housekeeping -------------------------------------------------------------
    def clean_leftovers(self, markers: dict[str, dict]) -> list[str]:
        """Remove what interrupted attempts left: scratch files, progress records, plan shards, and
        parts and rejections that no done-marker names (published, then killed before the marker; or
        replaced by a later commit of the unit). Returns what was removed."""
        named = {name for marker in markers.values() for name in files_of(marker)}
        removed = []
        for sub in (ATTEMPTS, PROGRESS, PLANS):
            for path in self._ls(self.path(sub)):
                self._remove_quietly(path, recursive=True)
                removed.append(path)
        orphans = [self.path(n) for n in self.part_files() if n not in named]
        orphans += [p for p in self._ls(self.path(REJECTS))
                    if posixpath.join(REJECTS, posixpath.basename(p)) not in named]
        for path in orphans:
            self._remove_quietly(path)
        return removed + orphans

    def remove_unit(self, marker: dict) -> None:
        """Take a committed unit back (its file changed): the marker first, so that a kill midway
        leaves at worst an unmarked part, which the next run's cleanup removes."""
        self._remove_quietly(self.path(marker_name(marker['unit_id'])))
        for relative in files_of(marker):
            self._remove_quietly(self.path(relative))

    def remove_all(self) -> None:
        """``--overwrite``: delete everything in the output folder but the lock of the run doing it."""
        # Markers, manifest and numerics first: a kill midway must not leave markers whose parts are gone.
        first = {CHECKPOINTS: 0, MANIFEST: 1, NUMERICS: 1, CANARIES: 1}
        paths = sorted(self._ls(self.root), key=lambda p: first.get(posixpath.basename(p), 2))
        for path in paths:
            if posixpath.basename(path) != LOCK:
                self._remove_quietly(path, recursive=True)

    # --- helpers -------------------------------------------------------------------------
    def _read_json_dir(self, sub: str) -> tuple[dict[str, object], dict[str, str]]:
        """(name -> JSON record, name -> why it cannot be parsed) for every ``NAME.json`` under ``sub``,
        fetched concurrently where the store allows (one round trip per file is what makes reading
        thousands of markers slow on object stores)."""
        paths = [p for p in self._ls(self.path(sub)) if p.endswith(".json")]
        records, unreadable = {}, {}
        for path, content in (self.fs.cat(paths, on_error="return") if paths else {}).items():
            name = record_key(path)
            if isinstance(content, FileNotFoundError):  # removed since the listing (a unit finished)
                continue
            if isinstance(content, Exception):
                raise content
            try:
                records[name] = json.loads(content)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                unreadable[name] = f"{type(exc).__name__}: {exc}"
        return records, unreadable


def snapshot(markers: dict[str, dict], retried: set[str] = frozenset()) -> list[dict]:
    """The output's files that the duplicate-id check counts, from the done-markers as the run is
    planned: every part, and the rejections holding ``duplicate_id`` rows (except those of units whose
    ``duplicate_id`` rows this run retries: they are rows to do)."""
    records = [{"kind": "part", "name": name, "rows": m.get("rows", m["embedded"]) if name == m["part"] else 0}
               for m in markers.values() for name in parts_of(m)]  # rows: for dedup.find_here's passes
    records += [{"kind": "rejects", "name": m["rejects"], "rows": m["rejected"]} for uid, m in markers.items()
                if m.get("rejects") and m.get("rejected_by_reason", {}).get("duplicate_id") and uid not in retried]
    return sorted(records, key=lambda r: r["name"])


def marker_totals(markers) -> dict:
    """The counts of done-markers summed: the one place that knows which marker fields add up, and
    what markers written before a field existed imply (rows and windows: one per document)."""
    markers = list(markers)
    total = {k: sum(m[k] for m in markers) for k in ("embedded", "rejected", "truncated", "tokens", "padded_tokens")}
    total.update({k: sum(m.get(k, m["embedded"]) for m in markers) for k in ("rows", "windows")})
    total.update({k: sum(m.get(k, 0) for m in markers) for k in ("text_tokens", "dropped_tokens")})
    # Whether any unit's dropped tokens were estimated from characters (--count-dropped estimate).
    total["dropped_estimated"] = any(m.get("count_dropped") == "estimate" for m in markers)
    return total
