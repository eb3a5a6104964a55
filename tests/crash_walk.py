"""Runs docembed once per crash point, killed there (``os._exit``, armed through DOCEMBED_FAULT), then
again unarmed, each in a process of its own; prints one JSON line of exit codes.

With ``"again": [faults]`` in the spec, between the two a third process runs the killed run's
embedding job again, as it was submitted (its plan and settings, recorded when the killed run
submitted it): what Flink or Spark do when they re-run a stage whose worker was lost, after some of
its units' parts or markers exist.

Used by tests/test_crash_points.py. It imports docembed once and forks a process per run, so that a
run costs its work rather than its imports. Nothing here runs the model before forking, so no thread
pools exist yet to be broken by the fork.

    python -m tests.crash_walk SPEC.json     # {"argv": [...], "outputs": {name: url}, "faults": [...]}
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import traceback

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

import sentence_transformers  # noqa: F401 - imported before forking, so each child starts warm
import transformers  # noqa: F401

import docembed.pipeline.execute as execute_mod
import docembed.transforms.embed  # noqa: F401
from docembed.cli import main
from docembed.pipeline.options import QUIET_WORKERS


def forked(argv: list[str], fault: str | None, log: str, record: str | None = None) -> int:
    """``docembed`` with ``argv`` in a child process armed with ``fault``; with ``record``, the child
    saves the plan and settings of the embedding job it submits there."""

    def command() -> int:
        if record:
            _record_embedding_job(record)
        return main(argv)

    return _in_child(command, log, fault)


def again(record: str, log: str) -> int:
    """The embedding job recorded by ``forked``, run again to the end in a child process."""

    def rerun() -> int:
        with open(record, "rb") as handle:
            plan, settings = pickle.load(handle)
        execute_mod.run_graph(beam.Pipeline(options=PipelineOptions(QUIET_WORKERS)), plan, settings)
        return 0

    return _in_child(rerun, log, None)


def _record_embedding_job(record: str) -> None:
    submit = execute_mod.run_graph

    def recording(pipeline, plan, settings, *args, build=execute_mod.build_graph, **kwargs):
        if build is execute_mod.build_graph:
            with open(record, "wb") as handle:
                pickle.dump((plan, settings), handle)
        return submit(pipeline, plan, settings, *args, build=build, **kwargs)

    execute_mod.run_graph = recording


def _in_child(function, log: str, fault: str | None) -> int:
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
            code = function()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - the child reports and exits; the walk goes on
            traceback.print_exc()
            code = 1
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
        name = f"{spec['logs']}/{fault.replace(':', '_').replace('@', '_')}"
        if fault in spec.get("again", []):
            killed = forked(argv, fault, f"{name}.log", f"{name}.job")
            results[fault] = [killed, again(f"{name}.job", f"{name}.log"), forked(argv, None, f"{name}.log")]
        else:
            results[fault] = [forked(argv, fault, f"{name}.log"), forked(argv, None, f"{name}.log")]
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        print(json.dumps(walk(json.load(handle))))
