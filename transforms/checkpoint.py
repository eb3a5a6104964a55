"""Checkpoint: the one owner of resume state and of every bookkeeping name in the output folder.

Layout of an output folder::

    part-<unit_id>.parquet        the data: one part per committed work unit
    _checkpoints/<unit_id>.json   done-markers, written after the part; the source of truth
    _attempts/                    scratch files of in-flight attempts (local disks only)
    _progress/<unit_id>.json      documents embedded so far in a unit that is running
    _rejects/<unit_id>.parquet    rows that could not be embedded, with their reasons
    _manifest.json                the run's fingerprint, plan and, when complete, counts and parts
    _lock.json                    the running run's lock (pipeline/lock.py)
    _stop                         asks workers to take no new unit (the run got SIGTERM)

Readers (pyarrow, DuckDB, pandas) skip names starting with ``_`` or ``.``, so they only see parts.
"""

from __future__ import annotations

import json
import posixpath
import time
from typing import Iterable

from transforms import storage

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
CHECKPOINTS = "_checkpoints"
ATTEMPTS = "_attempts"
PROGRESS = "_progress"
REJECTS = "_rejects"
MANIFEST = "_manifest.json"
LOCK = "_lock.json"
STOP = "_stop"


def part_name(unit_id: str) -> str:
    return f"{PART_PREFIX}{unit_id}{PART_SUFFIX}"


def unit_id_of_part(name: str) -> str | None:
    base = posixpath.basename(name)
    if base.startswith(PART_PREFIX) and base.endswith(PART_SUFFIX):
        return base[len(PART_PREFIX) : -len(PART_SUFFIX)]
    return None


class OutputFolder:
    """Every read and write of bookkeeping goes through here (commit, planning, status, progress).

    Picklable: it keeps only the URL and opens the filesystem lazily in each process.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._fs = None
        self._root = None

    def __getstate__(self):
        return {"url": self.url}

    def __setstate__(self, state):
        self.__init__(state["url"])

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._root = storage.filesystem(self.url)
        return self._fs

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 - opens the filesystem and sets the root
        return self._root

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # --- writing -------------------------------------------------------------------------
    def publish(self, relative: str, data: bytes) -> None:
        storage.publish(self.fs, self.path(relative), data, self.path(ATTEMPTS))

    def write_part(self, unit_id: str, data: bytes) -> str:
        name = part_name(unit_id)
        self.publish(name, data)
        return name

    def remove(self, relative: str) -> None:
        self._remove_quietly(self.path(relative))

    def read_lock(self) -> dict | None:
        """The lock record; for a lock file that cannot be parsed (its writer was killed while writing
        it), a record without a token whose heartbeat is the file's modification time, so it goes stale."""
        try:
            with self.fs.open(self.path(LOCK), "rb") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            mtime = storage.modified_time(self.fs.info(self.path(LOCK)))
            return {"host": "unknown (unreadable lock file)", "pid": None, "since": 0,
                    "heartbeat": float(mtime or 0)}

    def mark_done(self, unit_id: str, record: dict) -> None:
        """Written last, after the part is published: from here on the unit counts as done."""
        self.publish(posixpath.join(CHECKPOINTS, f"{unit_id}.json"), _dumps(record))
        self._remove_quietly(self.path(PROGRESS, f"{unit_id}.json"))

    def write_progress(self, unit_id: str, docs: int, total: int, text_bytes: int = 0) -> None:
        record = {"unit_id": unit_id, "docs": docs, "total": total, "text_bytes": text_bytes, "time": time.time()}
        self.publish(posixpath.join(PROGRESS, f"{unit_id}.json"), _dumps(record))

    def write_manifest(self, manifest: dict) -> None:
        self.publish(MANIFEST, _dumps(manifest))

    # --- reading -------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def is_done(self, unit_id: str) -> bool:
        return self.fs.exists(self.path(CHECKPOINTS, f"{unit_id}.json"))

    def done_ids(self) -> set[str]:
        """Ids of committed units, from marker names alone (cheap enough to poll)."""
        return {
            posixpath.basename(p)[: -len(".json")]
            for p in self._ls(self.path(CHECKPOINTS)) if p.endswith(".json")
        }

    def done_markers(self) -> dict[str, dict]:
        """unit_id -> marker record, for every committed unit."""
        return {rec["unit_id"]: rec for rec in self._read_json_dir(CHECKPOINTS)}

    def progress(self) -> dict[str, dict]:
        """unit_id -> latest progress record of units still running (or interrupted)."""
        return {rec["unit_id"]: rec for rec in self._read_json_dir(PROGRESS)}

    def read_manifest(self) -> dict | None:
        try:
            with self.fs.open(self.path(MANIFEST), "rb") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def part_files(self) -> list[str]:
        """Names of the published part files, relative to the output folder."""
        return sorted(
            posixpath.basename(p) for p in self._ls(self.root) if unit_id_of_part(p) is not None
        )

    # --- resume housekeeping -------------------------------------------------------------
    def clean_leftovers(self, done_ids: Iterable[str]) -> list[str]:
        """Remove what interrupted attempts left: scratch files, progress records, and parts whose
        unit has no done-marker (published, then killed before the marker). Returns what was removed."""
        done = set(done_ids)
        removed = []
        for sub in (ATTEMPTS, PROGRESS):
            for path in self._ls(self.path(sub)):
                self._remove_quietly(path)
                removed.append(path)
        orphans = [self.path(n) for n in self.part_files() if unit_id_of_part(n) not in done]
        orphans += [
            p for p in self._ls(self.path(REJECTS))
            if posixpath.basename(p).split(".")[0] not in done
        ]
        for path in orphans:
            self._remove_quietly(path)
        return removed + orphans

    def remove_unit(self, marker: dict) -> None:
        """Take a committed unit back (its file changed): the marker first, so that a kill midway
        leaves at worst an unmarked part, which the next run's cleanup removes."""
        unit_id = marker["unit_id"]
        self._remove_quietly(self.path(CHECKPOINTS, f"{unit_id}.json"))
        for relative in (marker.get("part"), marker.get("rejects")):
            if relative:
                self._remove_quietly(self.path(relative))

    def remove_all(self) -> None:
        """``--overwrite``: delete everything in the output folder but the lock of the run doing it."""
        # Markers and manifest first: a kill midway must not leave markers whose parts are gone.
        first = {CHECKPOINTS: 0, MANIFEST: 1}
        paths = sorted(self._ls(self.root), key=lambda p: first.get(posixpath.basename(p), 2))
        for path in paths:
            if posixpath.basename(path) != LOCK:
                self.fs.rm(path, recursive=True)

    def request_stop(self) -> None:
        self.publish(STOP, b"")

    def stop_requested(self) -> bool:
        return self.fs.exists(self.path(STOP))

    def clear_stop(self) -> None:
        self._remove_quietly(self.path(STOP))

    # --- helpers -------------------------------------------------------------------------
    def _ls(self, path: str) -> list[str]:
        try:
            return [
                entry if isinstance(entry, str) else entry["name"]
                for entry in self.fs.ls(path, detail=False, refresh=True)
            ]
        except TypeError:  # filesystems whose ls() takes no refresh flag
            return list(self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def _read_json_dir(self, sub: str) -> list[dict]:
        records = []
        for path in self._ls(self.path(sub)):
            if not path.endswith(".json"):
                continue
            try:
                with self.fs.open(path, "rb") as handle:
                    records.append(json.load(handle))
            except FileNotFoundError:  # removed between listing and reading (a unit finished)
                continue
        return records

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass


def _dumps(record: dict) -> bytes:
    return json.dumps(record, indent=1, sort_keys=True).encode()


def marker_totals(markers) -> dict:
    """The counts of done-markers summed: the one place that knows which marker fields add up, and
    what markers written before a field existed imply (rows and windows: one per document)."""
    markers = list(markers)
    total = {k: sum(m[k] for m in markers) for k in ("embedded", "rejected", "truncated", "tokens", "padded_tokens")}
    total.update({k: sum(m.get(k, m["embedded"]) for m in markers) for k in ("rows", "windows")})
    total.update({k: sum(m.get(k, 0) for m in markers) for k in ("text_tokens", "dropped_tokens")})
    return total
