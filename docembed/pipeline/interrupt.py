"""Interrupt: on SIGTERM or SIGINT (a spot notice, a Kubernetes eviction, Ctrl-C), stop taking units.

The handler writes the output's ``_stop`` request with a deadline (now plus ``--grace-period``). Every
``ReadUnit`` checks it before it starts a unit, and every worker between batches, on any runner and in
any worker process: the unit in hand may finish before the deadline, and is abandoned at the first
batch past it (its part is published whole or not at all, its marker last); the job then ends and the
launcher exits. If it has not shortly after the deadline (a batch that never ends, a remote job that
does not stop), the launcher exits anyway, cancelling a remote job first.

Ctrl-C (SIGINT) means stop now: the launcher sends SIGTERM to its local worker processes (Ctrl-C at a
terminal has usually reached them already) and exits as soon as they are gone, with nothing left to
wait for. Beam starts those processes with a fixed command, so what they print as they die is theirs.
Either way the launcher says one line, "interrupted; rerun to resume", exits with code 143, and leaves
out the runner's errors about the workers it lost. When the stop request cannot be written (a full or
read-only disk, a failing store), the workers cannot be told: the launcher says so in that line, naming
the file and the cause, and stops at once, abandoning the units in hand.
"""

from __future__ import annotations

import glob
import logging
import os
import signal
import sys
import threading
import time

from docembed.pipeline.lock import process_alive
from docembed.store.admin import OutputAdmin
from docembed.errors import Interrupted

EXIT_ABANDONED = 143
CANCEL_WAIT_S = 30.0
# How long past the deadline the launcher waits for the workers to abandon their units and the job to end.
OVERTIME_S = 10.0


class StopOnSignal:
    """A context manager for the driver's main thread; ``check()`` raises Interrupted after a signal.
    ``job`` is the submitted PipelineResult, cancelled when the launcher gives up waiting."""

    def __init__(self, output: OutputAdmin, grace_s: float):
        self.output, self.grace_s = output, grace_s
        self.signalled = threading.Event()
        self.job = None
        self._previous = {}
        self._quiet = _QuietAfterSignal(self.signalled)
        self._excepthook = threading.excepthook

    def __enter__(self):
        self.output.clear_stop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._quiet)
        self._excepthook, threading.excepthook = threading.excepthook, self._thread_error
        return self

    def __exit__(self, kind, error, traceback):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._quiet)
        threading.excepthook = self._excepthook
        try:
            self.output.clear_stop()
        except OSError as exc:
            if error is None:
                raise
            # The run's own error stays the news; the next run removes the request before it starts.
            error.add_note(f"the stop request could not be removed ({exc})")

    def check(self) -> None:
        if self.signalled.is_set():
            raise Interrupted("interrupted; rerun to resume (committed units are kept)")

    def _handle(self, signum, frame):
        if self.signalled.is_set():  # a second signal: stop now
            self._abandon()
        self.signalled.set()
        try:
            self.output.request_stop(time.time() + self.grace_s)
        except OSError as exc:  # raised here, it would surface anywhere in the main thread
            self._abandon(f"the workers could not be told to stop: {exc}; the units in hand were abandoned")
        print(f"docembed: {signal.Signals(signum).name}: finishing the unit in hand (up to "
              f"{self.grace_s:.0f}s), then stopping", file=sys.stderr, flush=True)
        threading.Thread(target=self._after_grace, daemon=True).start()
        if signum == signal.SIGINT:  # Ctrl-C: stop now; local workers are told to go at once
            children = _children()
            for pid in children:
                os.kill(pid, signal.SIGTERM)
            # Only here does a worker process ending mean the stop: after SIGTERM to the launcher alone,
            # workers also end when the job ends normally, having abandoned their units in time.
            threading.Thread(target=self._when_workers_die, args=(children,), daemon=True).start()

    def _after_grace(self):
        time.sleep(self.grace_s + OVERTIME_S)
        self._abandon()

    def _when_workers_die(self, children: set[int]):
        """Local worker processes are this process's children: when a signal to the whole process
        group has killed them all, there is nothing left to wait for."""
        if not children:
            return
        while _children() & children:
            time.sleep(0.2)
        self._abandon("the local workers stopped with the signal; the units in hand were abandoned")

    def _thread_error(self, args):
        """A runner thread failing after the signal stopped its workers is expected, and not printed."""
        if not self.signalled.is_set():
            self._excepthook(args)

    def _abandon(self, why: str = "the unit in hand was abandoned"):
        if self.job is not None:
            _cancel(self.job)
        print(f"docembed: error: interrupted; rerun to resume ({why})", file=sys.stderr, flush=True)
        os._exit(EXIT_ABANDONED)


def _cancel(job) -> None:
    """Cancel a submitted remote job, waiting a little for the runner to take it (best effort)."""
    done = threading.Event()

    def cancel():
        try:
            job.cancel()
            print("docembed: cancelled the submitted job", file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - the launcher is exiting either way
            print(f"docembed: could not cancel the submitted job: {exc}", file=sys.stderr, flush=True)
        done.set()

    threading.Thread(target=cancel, daemon=True).start()
    done.wait(CANCEL_WAIT_S)


def _children() -> set[int]:
    """This process's live child processes (Linux), zombies excluded."""
    pids = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(path) as handle:
                pids.update(int(p) for p in handle.read().split())
        except OSError:
            continue
    return {p for p in pids if process_alive(p)}


class _QuietAfterSignal(logging.Filter):
    """After a stop signal, the runner's errors about workers that the signal stopped are expected:
    they are left out, and the launcher says what happened in one line."""

    def __init__(self, signalled: threading.Event):
        super().__init__()
        self.signalled = signalled

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.signalled.is_set() and record.name.startswith("apache_beam"))
