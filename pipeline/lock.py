"""Lock: one run at a time per output folder, through ``_lock.json``, with a heartbeat and a TTL.

A run takes the lock before it changes anything and a heartbeat thread refreshes it every TTL / 4.
A second run finds a fresh lock and stops at once with exit code 75 (``LockHeld``), naming the holder
and since when (or waits, with ``--wait-for-lock``). A lock whose heartbeat is older than the TTL, or
whose holder ran on this host and no longer exists, was left by a killed run and is taken over.
Taking it is an exclusive create (``storage.create_exclusive``): a hard link on local disks, a
conditional PUT (``If-None-Match: *``) on S3. Other object stores get a put followed by a read-back
after a short settle time, which two runs starting within that window can both pass: there,
schedule runs so they do not start together. Taking over a stale lock removes it first, and two runs doing that at the
same moment can both succeed; the loser finds out at its next heartbeat. The heartbeat also re-reads the lock,
and a run that finds it was taken over stops committing (``lost`` is set).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from pipeline.output import OutputAdmin
from transforms.errors import LockHeld

log = logging.getLogger(__name__)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process here. A zombie (killed, never reaped: on hosts whose init
    does not reap orphans it stays in the process table) is dead, though signal 0 still reaches it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class OutputLock:
    def __init__(self, output: OutputAdmin, ttl_s: float = 120.0, wait_s: float = 0.0):
        self.output, self.ttl_s, self.wait_s = output, ttl_s, wait_s
        self.token = uuid.uuid4().hex
        self.record = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.time()}
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self):
        deadline = time.monotonic() + self.wait_s
        while not self._try_take():
            if time.monotonic() >= deadline:
                raise LockHeld(self._held_message())
            time.sleep(min(2.0, self.ttl_s / 4))
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if (self._read() or {}).get("token") == self.token:
            try:
                self.output.remove_lock()
            except OSError:  # the store failed: the lock goes stale after the TTL
                pass

    # --- internals -----------------------------------------------------------------------
    def _try_take(self) -> bool:
        current = self._read()
        if current and not self._is_stale(current):
            return False
        if current:  # stale: its run was killed; remove it and race for a fresh one
            self.output.remove_lock()  # another run may have removed it first; the exclusive create decides
        self.record["heartbeat"] = time.time()
        if self.output.create_lock(self.record):
            return True
        # A retried create whose first attempt took effect (its answer was lost) finds its own lock.
        return (self._read() or {}).get("token") == self.token

    def _is_stale(self, lock: dict) -> bool:
        """It cannot be read (docembed writes it whole, so it is no run's), its heartbeat is older than
        the TTL, or its holder ran on this host and is gone (a run killed here is restarted at once,
        with no TTL to wait out)."""
        if "unreadable" in lock:
            log.warning("%s/_lock.json cannot be read (%s): it is no run's lock; taking it over",
                        self.output.url, lock["unreadable"])
            return True
        if time.time() - lock.get("heartbeat", 0) >= self.ttl_s:
            return True
        if lock.get("host") == socket.gethostname() and isinstance(lock.get("pid"), int):
            return not process_alive(lock["pid"])
        return False

    def _beat(self):
        refreshed = time.monotonic()
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current = self._read()
                if current and current.get("token") != self.token:
                    self.lost.set()
                    return
                self.record["heartbeat"] = time.time()
                self.output.write_lock(self.record)
                refreshed = time.monotonic()
            except OSError:  # a transient store error: retry at the next beat, give up past the TTL
                if time.monotonic() - refreshed > self.ttl_s:
                    self.lost.set()
                    return

    def _read(self) -> dict | None:
        return self.output.read_lock()

    def _held_message(self) -> str:
        held = self._read() or {}
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(held.get("since", 0)))
        age = time.time() - held.get("heartbeat", 0)
        return (f"{self.output.url} is locked by another run: {held.get('host')} pid {held.get('pid')}, "
                f"since {since}, last heartbeat {age:.0f}s ago (stale after {self.ttl_s:.0f}s); "
                "wait for it, or pass --wait-for-lock SECONDS")
