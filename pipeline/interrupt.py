"""Interrupt: on SIGTERM or SIGINT (a spot notice, a Kubernetes eviction, Ctrl-C), stop taking units.

The handler writes the output's ``_stop`` marker, which every ``ReadUnit`` checks before it starts a
unit, on any runner and in any worker process. The unit in hand may finish within the grace period;
past it the process exits at once, abandoning that unit cleanly (its part is published whole or not
at all, its marker last). Either way the run exits non-zero, "interrupted; rerun to resume".
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from pipeline.output import OutputAdmin
from transforms.errors import Interrupted

EXIT_ABANDONED = 143


class StopOnSignal:
    """A context manager for the driver's main thread; ``check()`` raises Interrupted after a signal."""

    def __init__(self, output: OutputAdmin, grace_s: float):
        self.output, self.grace_s = output, grace_s
        self.signalled = threading.Event()
        self._previous = {}

    def __enter__(self):
        self.output.clear_stop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self.output.clear_stop()

    def check(self) -> None:
        if self.signalled.is_set():
            raise Interrupted("interrupted; rerun to resume (committed units are kept)")

    def _handle(self, signum, frame):
        if self.signalled.is_set():  # a second signal: stop now
            self._abandon()
        self.signalled.set()
        print(f"docembed: {signal.Signals(signum).name}: finishing the unit in hand (up to "
              f"{self.grace_s:.0f}s), then stopping", file=sys.stderr, flush=True)
        self.output.request_stop()
        timer = threading.Timer(self.grace_s, self._abandon)
        timer.daemon = True
        timer.start()

    def _abandon(self):
        print("docembed: error: interrupted; rerun to resume (the unit in hand was abandoned)",
              file=sys.stderr, flush=True)
        os._exit(EXIT_ABANDONED)
