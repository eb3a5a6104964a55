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

Whether a lock is a live run's is one pure function, ``why_stale``, which the run taking the lock and the
``status``, ``verify`` and ``run --dry-run`` commands all use; the record carries its holder's TTL for
the commands that judge it without one of their own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from docembed.store.admin import OutputAdmin
from docembed.errors import LockHeld, OutputError

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 60.0  # --lock-ttl's default: the TTL of a lock written before locks recorded theirs


class LockLost(OutputError):
    """This run's lock was taken over, or its heartbeat could not be written for longer than the TTL,
    during the run: exit 1, as a failed job (the work was done; whether it is whole, verify says)."""

    exit_code = 1


def why_stale(lock: dict, now: float, host: str, ttl_s: float | None = None, alive=None) -> str | None:
    """Why the ``_lock.json`` record ``lock`` is no live run's, or None when it is live: it cannot be
    read (docembed writes it whole, so it is no run's), its heartbeat is at least ``ttl_s`` old (None:
    the TTL the holder recorded), or its holder ran on ``host`` (this machine) and ``alive(pid)``
    (``process_alive``) says it is gone. Pure but for ``alive``: ``now`` and ``host`` are given."""
    if "unreadable" in lock:
        return f"it cannot be read ({lock['unreadable']})"
    ttl_s = ttl_s if ttl_s is not None else float(lock.get("ttl") or DEFAULT_TTL_S)
    age = now - float(lock.get("heartbeat") or 0)
    if age >= ttl_s:
        return f"its last heartbeat is {age:.0f}s old (stale after {ttl_s:.0f}s)"
    if lock.get("host") == host and isinstance(lock.get("pid"), int) and not (alive or process_alive)(lock["pid"]):
        return f"its process (pid {lock['pid']}) is gone from this host"
    return None


def holder(lock: dict, now: float) -> str:
    """Who holds ``lock`` and how lately it showed life: ``host H pid P, since T, last heartbeat Ns ago``."""
    return (f"{lock.get('host')} pid {lock.get('pid')}, since {utc(lock.get('since') or 0)}, "
            f"last heartbeat {now - float(lock.get('heartbeat') or 0):.0f}s ago")


def lock_state(output: OutputAdmin) -> dict | None:
    """The output's lock as ``status``, ``verify`` and ``run --dry-run`` show it, judged by ``why_stale``
    at the TTL its holder recorded: None when there is none, else ``live``, ``stale`` (why it is no
    live run's, or None), ``holder`` (``holder``), and its ``host``, ``pid`` and ``heartbeat``."""
    lock = output.read_lock()
    if lock is None:
        return None
    now = time.time()
    why = why_stale(lock, now, socket.gethostname())
    return {"live": why is None, "stale": why, "holder": "unreadable" if "unreadable" in lock else holder(lock, now),
            "host": lock.get("host"), "pid": lock.get("pid"), "heartbeat": lock.get("heartbeat")}


def utc(seconds: float) -> str:
    """A time as the commands print it: ``2026-11-27 13:27:41 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


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
                       "since": time.time(), "ttl": ttl_s}
        self.lost = threading.Event()
        self.lost_why = ""  # how it was lost, once ``lost`` is set
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

    def __exit__(self, kind, error, traceback):
        self._stop.set()
        self._thread.join()
        try:
            if (self._read() or {}).get("token") == self.token:
                self.output.remove_lock()
        except OSError as exc:  # the lock stays, and goes stale after the TTL
            said = (f"releasing the lock failed ({exc}): it goes stale {self.ttl_s:.0f}s after its last heartbeat, "
                    "or at once for a run on this host")
            if error is None:
                raise LockLost(f"this run's work is done, but {said}") from exc
            error.add_note(said)  # the run's own error stays the news

    def check(self) -> None:
        """Raise ``LockLost`` when the lock was lost during the run (``lost``), saying how."""
        if self.lost.is_set():
            raise LockLost(f"{self.lost_why}; check the output with `docembed verify --output {self.output.url}`")

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
        """``why_stale`` at this run's own TTL: a run killed on this host is restarted at once, with no
        TTL to wait out."""
        if "unreadable" in lock:
            log.warning("%s/_lock.json cannot be read (%s): it is no run's lock; taking it over",
                        self.output.url, lock["unreadable"])
        return why_stale(lock, time.time(), socket.gethostname(), self.ttl_s) is not None

    def _beat(self):
        refreshed = time.monotonic()
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current = self._read()
                if current and current.get("token") != self.token:
                    self.lost_why = (f"another run took over {self.output.url}'s lock during this run "
                                     f"({holder(current, time.time())})")
                    self.lost.set()
                    return
                self.record["heartbeat"] = time.time()
                self.output.write_lock(self.record)
                refreshed = time.monotonic()
            except OSError as exc:  # a transient store error: retry at the next beat, give up past the TTL
                if time.monotonic() - refreshed > self.ttl_s:
                    self.lost_why = (f"the lock's heartbeat could not be written for {self.ttl_s:g}s ({exc}), "
                                     "so another run may have taken the output over")
                    self.lost.set()
                    return

    def _read(self) -> dict | None:
        return self.output.read_lock()

    def _held_message(self) -> str:
        return (f"{self.output.url} is locked by another run: {holder(self._read() or {}, time.time())} "
                f"(stale after {self.ttl_s:.0f}s); wait for it, or pass --wait-for-lock SECONDS")
