"""Runs docembed once per crash point, killed there (``os._exit``, armed through DOCEMBED_FAULT), then
again unarmed, each in a process of its own; prints one JSON line of exit codes.

Used by tests/test_crash_points.py. It imports docembed once and forks a process per run, so that a
run costs its work rather than its imports. Nothing here runs the model before forking, so no thread
pools exist yet to be broken by the fork.

    python -m tests.crash_walk SPEC.json     # {"argv": [...], "outputs": {name: url}, "faults": [...]}
"""

from __future__ import annotations

import json
import os
import sys

import sentence_transformers  # noqa: F401 - imported before forking, so each child starts warm
import transformers  # noqa: F401

import pipeline.run  # noqa: F401
import transforms.embed  # noqa: F401
from pipeline.cli import main


def forked(argv: list[str], fault: str | None, log: str) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        with open(log, "ab") as handle:
            os.dup2(handle.fileno(), 1)
            os.dup2(handle.fileno(), 2)
        if fault:
            os.environ["DOCEMBED_FAULT"] = fault
        else:
            os.environ.pop("DOCEMBED_FAULT", None)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def walk(spec: dict) -> dict:
    results = {}
    for fault in spec["faults"]:
        output = spec["outputs"][fault]
        argv = [*spec["argv"], "--output", output]
        log = f"{spec['logs']}/{fault.replace(':', '_').replace('@', '_')}.log"
        results[fault] = [forked(argv, fault, log), forked(argv, None, log)]
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        print(json.dumps(walk(json.load(handle))))
