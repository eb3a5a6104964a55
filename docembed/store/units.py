"""The workers' unit store: what a worker may do to the output folder (``UnitStore``).

It reads the run's plan, skips done units, reports progress, publishes a unit's part and rejections,
pins or checks the output's numerics and canaries, and writes the done-marker last. Every name it
writes comes from ``store.layout``. What only the launcher does (cleaning up, taking units back, the
manifest, the lock) is ``docembed.store.admin.OutputAdmin``, built on this.
"""

from __future__ import annotations

import json
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from docembed.model import canaries, numerics

from docembed.store import faults, storage
from docembed.store.layout import (ATTEMPTS, CANARIES, LOCK, NUMERICS, QUANTIZATION, STOP, kind_of, marker_name, part_name,
                                    progress_name, repeats_name, unit_id_of_part)
from docembed.errors import CanaryMismatch, CommitError, DamagedRecord, NumericsMismatch
from docembed.records import WorkUnit
from docembed.vectors import calibration

class UnitStore:
    """A worker's access to the output folder. Picklable: it keeps only the URL and opens the
    filesystem lazily in each process."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._fs = None
        self._root = None
        self._pinned = None  # this process's numerics, once checked against the output's
        self._ranges = None  # the output's int8/uint8 calibration, once read
        self._canaries = None  # the output's pinned canaries, once read

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

    # --- the unit's work -----------------------------------------------------------------
    def plan_units(self, shard: str) -> list[WorkUnit]:
        """The work units of one plan shard (``_plans/<run_id>/units-N.jsonl``)."""
        return [WorkUnit.from_json(record) for record in self.plan_records(shard)]

    def plan_records(self, shard: str) -> list[dict]:
        """The JSON records of one plan shard (``_plans/<run_id>/*.jsonl``)."""
        with self.fs.open(self.path(shard), "rb") as handle:
            return [json.loads(line) for line in handle.read().splitlines() if line.strip()]

    def write_repeats(self, run_id: str, unit_id: str, rows: dict[int, str]) -> None:
        """The unit's rows whose id repeats an earlier occurrence, {row: message}, found by ``dedup``."""
        self.publish(repeats_name(run_id, unit_id), dumps({"rows": sorted(rows.items())}))

    def read_repeats(self, run_id: str, unit_id: str) -> dict[int, str]:
        """What ``write_repeats`` wrote for the unit in this run; {} where its rows repeat nothing. The
        duplicate-id job has finished before any unit is read, so a missing file means no repeats."""
        record = self._read_json(self.path(repeats_name(run_id, unit_id)))
        return {int(row): message for row, message in (record or {}).get("rows", [])}

    def is_done(self, unit_id: str) -> bool:
        return self.fs.exists(self.path(marker_name(unit_id)))

    def stop_requested(self) -> bool:
        return self.fs.exists(self.path(STOP))

    def stop_deadline(self) -> float | None:
        """When a stop was asked for: the time by which the unit in hand must be finished or abandoned
        (the signal's time plus the grace period); None when no stop was asked for."""
        try:
            record = self._read_json(self.path(STOP))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return 0.0  # a stop request that cannot be read: stop at once
        if record is None:
            return None
        return float(record.get("deadline", 0.0)) if isinstance(record, dict) else 0.0

    def part_files(self) -> list[str]:
        """Names of the published part files, relative to the output folder."""
        return sorted(posixpath.basename(p) for p in self._ls(self.root) if unit_id_of_part(p) is not None)

    def open(self, relative: str):
        return self.fs.open(self.path(relative), "rb")

    def write_progress(self, unit_id: str, docs: int, total: int, text_bytes: int = 0) -> None:
        record = {"unit_id": unit_id, "docs": docs, "total": total, "text_bytes": text_bytes, "time": time.time()}
        self.publish(progress_name(unit_id), dumps(record))

    # --- committing ----------------------------------------------------------------------
    def publish(self, relative: str, data: bytes, kind: str | None = None) -> None:
        """Make ``data`` appear at ``relative`` whole or not at all (``storage.publish``)."""
        kind, path = kind or kind_of(relative), self.path(relative)
        url = storage.full_url(self.fs, path)  # what an error raised at the fault points names
        faults.hit(f"publish:{kind}", path=url)
        storage.publish(self.fs, path, data, self.path(ATTEMPTS))
        faults.hit(f"published:{kind}", path=url)

    def create(self, relative: str, data: bytes, kind: str | None = None) -> bool:
        """Make ``data`` appear at ``relative`` unless something is there already; True when this
        call made it (``storage.create_exclusive``)."""
        kind, path = kind or kind_of(relative), self.path(relative)
        url = storage.full_url(self.fs, path)
        faults.hit(f"publish:{kind}", path=url)
        created = storage.create_exclusive(self.fs, path, data, self.path(ATTEMPTS))
        faults.hit(f"published:{kind}", path=url)
        return created

    def write_part(self, unit_id: str, data: bytes, retry: int = 0) -> str:
        name = part_name(unit_id, retry)
        self.publish(name, data)
        return name

    def read_marker(self, unit_id: str) -> dict | None:
        return self._read_json(self.path(marker_name(unit_id)))

    def rejections_to_retry(self, unit_id: str, reasons: tuple[str, ...]):
        """(the unit's marker, its rejections to keep, the rows to retry) for ``--retry-rejects``."""
        marker = self.read_marker(unit_id)
        if marker is None or not marker.get("rejects"):
            return marker, None, set()
        with self.open(marker["rejects"]) as handle:
            table = pq.read_table(handle)
        retry = pc.is_in(table.column("reason"), pa.array(list(reasons)))
        return marker, table.filter(pc.invert(retry)), set(table.filter(retry).column("row_index").to_pylist())

    def remove(self, relative: str) -> None:
        self._remove_quietly(self.path(relative))

    def check_numerics(self, mine: dict) -> None:
        """Before a commit: the output's vectors were made at ``mine``'s device and precision, or it
        has none yet and this commit pins them (an exclusive create: of two workers that race for
        the first commit with different numerics, one wins and the other fails here)."""
        if self._pinned is not None and numerics.same(self._pinned, mine):
            return
        output = self.read_numerics()
        if output is None:
            self.create(NUMERICS, dumps(mine))
            output = self.read_numerics()
        if output is None or not numerics.same(output, mine):
            raise NumericsMismatch(
                f"worker {mine.get('host')} would commit vectors made at {numerics.describe_numerics(mine)}, but "
                f"{self.url} holds vectors made at {numerics.describe_numerics(output or {})}; one output never mixes "
                "numerics: run its workers with the output's --device and --precision, or use a new --output"
            )
        self._pinned = mine

    def read_numerics(self) -> dict | None:
        return self._read_json(self.path(NUMERICS))

    def check_canaries(self, mine: dict, threshold: float) -> dict:
        """Before a commit: this worker's canary vectors (``mine``, with its numerics) are within
        ``threshold`` cosine of the output's, or the output has none yet and this commit pins them
        (an exclusive create, as for the numerics). Returns what the marker records of the check;
        raises CanaryMismatch (``canaries.check``) otherwise."""
        pinned_now = False
        if self._canaries is None:
            pinned = self.read_canaries()
            if pinned is None:
                candidate = canaries.pinnable(mine)
                if candidate is None:
                    if threshold <= -1:  # the check is off: nothing to pin, nothing refused
                        return {"checked": 0}
                    raise CanaryMismatch(
                        f"worker {mine['numerics'].get('host')}: the model embedded none of docembed's canary texts "
                        "(or only NaN or inf), so the numbers of the output's first vectors cannot be pinned: the "
                        "model or its device is broken; nothing is committed")
                pinned_now = self.create(CANARIES, dumps(candidate))
                pinned = self.read_canaries()
            if pinned is None:
                raise CommitError(f"{self.url}/{CANARIES} is not there after this worker pinned it: the store lost a "
                                  "write; rerun to resume")
            self._canaries = pinned
        return {**canaries.check(self._canaries, mine, threshold), "pinned": pinned_now}

    def read_canaries(self) -> dict | None:
        """The output's pinned canaries; None where none are pinned; DamagedRecord where the file is not
        a canary record (``docembed.pipeline.admin.repair.restore_canaries`` restores it from the manifest's copy)."""
        try:
            with self.fs.open(self.path(CANARIES), "rb") as handle:
                record = json.load(handle)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            record = exc
        if not (isinstance(record, dict) and isinstance(record.get("texts"), dict)
                and isinstance(record.get("vectors"), dict)):
            raise DamagedRecord(f"{self.url}/{CANARIES} is not a canary record ({str(record)[:100]}); the next run "
                                "restores it from the manifest's copy")
        return record

    def quantization_ranges(self, dtype: str, vectors: np.ndarray) -> np.ndarray:
        """The output's int8/uint8 calibration, per-dimension [min, max]: pinned by the first commit
        from its own vectors (an exclusive create, so racing workers end up with the same ranges)."""
        if self._ranges is None:
            if self.read_quantization() is None:
                self.create(QUANTIZATION, dumps({"output_dtype": dtype, "ranges": calibration(vectors).tolist()}))
            self._ranges = np.asarray(self.read_quantization()["ranges"], dtype=np.float32)
        return self._ranges

    def read_quantization(self) -> dict | None:
        return self._read_json(self.path(QUANTIZATION))

    def read_lock(self) -> dict | None:
        """The lock record; for a lock file that cannot be parsed (docembed writes it whole, so it is
        not docembed's), a record that says so and holds no token."""
        try:
            record = self._read_json(self.path(LOCK))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return {"unreadable": f"{type(exc).__name__}: {exc}"}
        return record if record is None or isinstance(record, dict) else {"unreadable": "not a lock record"}

    def mark_done(self, unit_id: str, record: dict) -> None:
        """Written last, after the part is published: from here on the unit counts as done."""
        self.publish(marker_name(unit_id), dumps(record))
        self._remove_quietly(self.path(progress_name(unit_id)))

    # --- helpers -------------------------------------------------------------------------
    def _read_json(self, path: str) -> dict | None:
        """The JSON record at ``path``, None where there is none. Read in one request: an object store
        file opened for reading refuses to go on when the object is replaced under it (s3fs: EBUSY), as
        the lock is by every heartbeat."""
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

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

    def _remove_quietly(self, path: str, recursive: bool = False) -> None:
        """Remove ``path`` (absolute) if it is there (``storage.remove``: an OSError names it), passing
        the ``remove:KIND`` fault point. A fault raised there counts as the removal's own failure."""
        point, url = f"remove:{kind_of(posixpath.relpath(path, self.root))}", storage.full_url(self.fs, path)
        storage.remove(self.fs, path, recursive, before=lambda: faults.hit(point, path=url))


def dumps(record: dict) -> bytes:
    return json.dumps(record, indent=1, sort_keys=True).encode()
