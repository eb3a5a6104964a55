"""Every failing write says one line and exits with the right code: the launcher's (lock, manifest, plan,
report, removals, heartbeat) and the workers' (parts, pins), on a full disk (ENOSPC), a read-only file
system (EROFS), a failing disk (EIO) and an object store answering 503. Each is a real OSError: raised
by the operating system (a tmpfs remounted read-only mid-run), by s3fs (a proxy in front of SeaweedFS
answering 503), or at a store point by the ``errno=NAME`` fault action, which raises the OSError the
system would, naming the file. After each: one ``docembed: error:`` line naming the file and the
cause, and no traceback; exit 1 (2 only for the probe, before any work); a manifest saying how the run
ended (or, where that write failed too, the line says so); ``status`` agreeing; and the same command
run again gives the exact output of an uninterrupted run.

The runs go through ``tests.crash_walk`` (docembed imported once, a forked process per run). This file
is also the walker's script: ``python -m tests.test_write_errors SPEC.json``.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from tests.conftest import BUCKET, REPO, by_id, free_port, read_output, relay, tmpfs, wait_for, write_docs

# name: (DOCEMBED_FAULT, extra flags, exit code, what the error line says, the manifest's status after).
# One case per way a failure travels (a worker's commit, a pin, each launcher write and removal); the
# errnos are spread over them: how a failure travels does not depend on its errno.
CASES = {
    "part-enospc": ("publish:part@2:errno=ENOSPC", [], 1, ["the job failed", "No space left on device", "/part-"],
                    "failed"),
    "numerics-pin-eio": ("publish:numerics@1:errno=EIO", [], 1, ["the job failed", "Input/output error",
                                                                 "/_numerics.json"], "failed"),
    "lock-erofs": ("publish:lock@1:errno=EROFS", [], 1, ["Read-only file system", "/_lock.json"], None),
    "plan-erofs": ("publish:plan@1:errno=EROFS", [], 1, ["Read-only file system", "/_plans/"], "failed"),
    "manifest-end-and-its-record-eio": (
        "publish:manifest@2:errno=EIO,publish:manifest@3:errno=EIO", [], 1,
        ["Input/output error", "/_manifest.json", "the manifest could not record that the run failed"], "running"),
    "report-enospc": ("publish:report@1:errno=ENOSPC", [], 1, ["No space left on device", "/_reports/"], "failed"),
    "lock-release-eio": ("remove:lock@1:errno=EIO", [], 1, ["this run's work is done, but releasing the lock failed",
                                                             "Input/output error", "/_lock.json"], "complete"),
    "heartbeat-eio": ("publish:heartbeat@*:errno=EIO", ["--lock-ttl", "0.4"], 1,
                      ["heartbeat could not be written", "Input/output error", "/_lock.json"], "failed"),
}
CAUSES = ("No space left on device", "Read-only file system", "Input/output error", "An error occurred (503)")
STATUS_SAYS = {"failed": "failed at", "running": "interrupted at", "complete": "complete at", None: None}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs):
    """30 documents in 3 units of 10."""
    tmp = tmp_path_factory.mktemp("write-errors")
    ids, texts = docs
    write_docs(tmp / "in.parquet", ids[:30], texts[:30], row_group_size=10)
    return tmp


@pytest.fixture(scope="module")
def reference(corpus, tiny_window_model, tmp_path_factory) -> dict:
    """id -> vector of an uninterrupted run (in this process)."""
    from docembed.pipeline.run import run

    out = tmp_path_factory.mktemp("reference") / "out"
    run([*_argv(corpus, tiny_window_model)[1:], "--output", str(out)])
    return by_id(read_output(out))


def _argv(corpus, model) -> list[str]:
    return ["run", "--input", str(corpus / "in.parquet"), "--checkpoint-every", "10", "--no-progress",
            "--model", model]


def _walk(spec: dict, tmp_path, env: dict | None = None) -> dict:
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "tests.test_write_errors", str(tmp_path / "spec.json")], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _said(log: str) -> list[str]:
    """The lines docembed printed as errors."""
    return [line for line in log.splitlines() if line.startswith("docembed: error:")]


def _check_failure(name: str, result: dict, code: int, says: list[str], manifest_status) -> None:
    log = result["log"]
    assert result["codes"][0] == code, f"{name}: exit {result['codes']}\n{log[-3000:]}"
    said = _said(log)
    assert len(said) == 1 and "Traceback" not in log, f"{name}: {log[-3000:]}"
    assert all(s in said[0] for s in says), f"{name}: {said[0]}"
    cause = next(s for s in says if s in CAUSES)
    assert sum(cause in line for line in log.splitlines()) == 1, f"{name}: said more than once\n{log[-3000:]}"
    manifest = result["manifest"]
    assert (manifest or {}).get("status") == manifest_status, f"{name}: {manifest}"
    if manifest_status == "failed":  # the manifest names the cause as the line does
        assert says[-1] in manifest["error"] and manifest["ended_at"] >= manifest["started_at"], name
    if STATUS_SAYS[manifest_status]:
        assert STATUS_SAYS[manifest_status] in result["status"], f"{name}: {result['status']}"


def _check_rerun(name: str, url: str, result: dict, reference: dict) -> None:
    from docembed.store.admin import OutputAdmin
    from docembed.pipeline.admin.verify import verify

    assert result["codes"][1] == 0, f"{name}: the rerun exited {result['codes'][1]}\n{result['rerun_log'][-3000:]}"
    output = OutputAdmin(url)
    assert output.read_lock() is None and not output.stop_requested(), name
    assert output.read_manifest()["status"] == "complete", name
    assert verify(url, canaries=False).problems == [], name
    got = by_id(read_output(url) if "://" not in url else _s3_table(url))
    assert sorted(got) == sorted(reference), name
    assert max(np.abs(got[i] - reference[i]).max() for i in reference) < 1e-6, name


@pytest.mark.servers
def test_each_failing_write_gives_one_line_exit_1_a_recorded_end_and_an_exact_rerun(s3, corpus, tiny_window_model,
                                                                                    reference, tmp_path):
    """The cases above on local disk, and on S3 every PUT of the completed manifest answered 503 by the
    store (a proxy in front of SeaweedFS; the S3 client's retries cut to 2 attempts through fsspec's own
    configuration): one line naming the object and the 503, the failure record refused too and said so."""
    cases = {name: {"fault": fault, "argv": [*_argv(corpus, tiny_window_model), *extra, "--output",
                                             str(tmp_path / name)]} for name, (fault, extra, *_) in CASES.items()}
    _, env = s3
    host, port = env["AWS_ENDPOINT_URL"].removeprefix("http://").split(":")
    proxy = Store503((host, int(port)), "/_manifest.json")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    url = f"s3://{BUCKET}/write-errors/out"
    cases["s3-503"] = {"fault": None, "argv": [*_argv(corpus, tiny_window_model), "--output", url], "url": url,
                       "env": {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}"}}
    retries = json.dumps({"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}})
    try:
        results = _walk({"cases": cases, "logs": str(tmp_path)}, tmp_path, {**env, "FSSPEC_S3": retries})
    finally:
        proxy.shutdown()
    for name, (_, _, code, says, manifest_status) in CASES.items():
        _check_failure(name, results[name], code, says, manifest_status)
        _check_rerun(name, str(tmp_path / name), results[name], reference)
    assert proxy.refused >= 4  # the completed manifest and the failure record, each tried twice
    _check_failure("s3-503", results["s3-503"], 1, [f"{url}/_manifest.json", "An error occurred (503)",
                                                    "the manifest could not record that the run failed"], "running")
    _check_rerun("s3-503", url, results["s3-503"], reference)


@pytest.mark.unit
def test_an_output_that_cannot_be_written_is_refused_before_any_work_with_exit_2(corpus, tiny_window_model, tmp_path,
                                                                                 monkeypatch, capsys):
    """The probe that ``check_writable`` writes before the lock fails: a configuration error (2)."""
    from docembed.cli import main

    # Every passage: this process may have passed the point in earlier tests (faults count per process).
    monkeypatch.setenv("DOCEMBED_FAULT", "publish:probe@*:errno=EROFS")
    code = main([*_argv(corpus, tiny_window_model), "--output", str(tmp_path / "out")])
    said = _said(capsys.readouterr().err)
    assert code == 2 and len(said) == 1, said
    assert f"cannot write to --output {tmp_path / 'out'}: [Errno 30] Read-only file system: '{tmp_path}/out/_probe-" \
           in said[0]
    assert not (tmp_path / "out" / "_lock.json").exists() and not (tmp_path / "out" / "_manifest.json").exists()


def rerun_env(env: dict) -> dict:
    """``env`` without the fault and its gate."""
    return {k: v for k, v in env.items() if not k.startswith("DOCEMBED_FAULT")}


@pytest.fixture
def small_mount(tmp_path):
    """A real 16 MiB tmpfs that the test can remount read-only; skipped where mounting is not allowed."""
    yield from tmpfs(tmp_path, "16m")


@pytest.mark.e2e
def test_the_output_file_system_turning_read_only_mid_run(corpus, tiny_window_model, reference, tmp_path,
                                                          small_mount):
    """The file system is remounted read-only while the run holds its first unit's marker (a fault
    gate): every write after that fails with the system's own EROFS. One line, exit 1, no traceback
    (before: 156 lines ending in the stop request's removal); the manifest cannot record the failure and
    the line says so; status says the run is no longer running; after the remount read-write, the same
    command completes exactly."""
    out, gate = small_mount / "out", tmp_path / "gate"
    argv = [sys.executable, "-m", "docembed", *_argv(corpus, tiny_window_model), "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DOCEMBED_FAULT": "published:marker@1:pause",
           "DOCEMBED_FAULT_GATE": str(gate)}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list(tmp_path.glob("gate.arrived.*.1")), timeout=240, proc=proc,
             what="the run to be held at its first unit's marker")
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    (tmp_path / "gate.1").touch()
    _, err = proc.communicate(timeout=240)
    said = _said(err)
    assert proc.returncode == 1 and len(said) == 1 and "Traceback" not in err, err[-3000:]
    assert "Read-only file system" in said[0] and f"'{out}/" in said[0], said[0]
    assert sum("Read-only file system" in line for line in err.splitlines()) == 1, err[-3000:]  # said once
    assert "the manifest could not record that the run failed" in said[0], said[0]

    from docembed.pipeline.admin.status import status

    assert status(str(out))["state"] == "interrupted"  # its manifest says "running", and no run holds the lock
    subprocess.run(["mount", "-o", "remount,rw", str(small_mount)], check=True)
    rerun = subprocess.run(argv, cwd=REPO, env=rerun_env(env), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "2 committed this run, 1 already done" in rerun.stdout
    got = by_id(read_output(out))
    assert sorted(got) == sorted(reference) and max(np.abs(got[i] - reference[i]).max() for i in reference) < 1e-6


# --- an object store answering 503 (the S3 case above) ------------------------------------------------

class Store503(http.server.ThreadingHTTPServer):
    """A proxy in front of the S3 server that answers 503 Service Unavailable to every PUT of a key
    ending in ``failing`` after the first (the run's started manifest goes through; its completed one,
    and the record of the failure, do not), and forwards everything else."""

    def __init__(self, upstream: tuple[str, int], failing: str):
        super().__init__(("127.0.0.1", free_port()), _Forward)
        self.upstream, self.failing, self.passed, self.refused = upstream, failing, 0, 0


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT" and self.path.split("?")[0].endswith(self.server.failing):
            self.server.passed += 1
            if self.server.passed > 1:
                self.server.refused += 1
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        relay(self, body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def log_message(self, *args):
        pass


def _s3_table(url: str):
    import pyarrow.dataset as ds
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return ds.dataset(url.split("://", 1)[1], format="parquet", filesystem=fs).to_table()


# --- the walker: runs in its own process (``python -m tests.test_write_errors SPEC``) ----------------

def _state(url: str, path: str) -> int:
    """In a child: the output's manifest and status line after the failed run, into ``path``."""
    from docembed.store.admin import OutputAdmin
    from docembed.pipeline.admin.status import format_status, status

    manifest, _ = OutputAdmin(url).load_manifest()
    said = format_status(status(url)) if manifest else ""
    with open(path, "w") as handle:
        json.dump({"manifest": manifest, "status": said}, handle)
    return 0


def walk(spec: dict) -> dict:
    """Per case: the run with its fault (and environment), the output's state, and the same command
    again without them. Returns {case: {codes, log, rerun_log, manifest, status}}."""
    from tests.crash_walk import _in_child, forked

    logs = spec["logs"]
    results = {}
    for name, case in spec["cases"].items():
        saved = dict(os.environ)
        os.environ.update(case.get("env", {}))
        code = forked(case["argv"], case["fault"], f"{logs}/{name}.log")
        url = case.get("url") or case["argv"][-1]
        _in_child(lambda: _state(url, f"{logs}/{name}.state.json"), f"{logs}/{name}.state.log", None)
        os.environ.clear()
        os.environ.update(saved)
        rerun = forked(case["argv"], None, f"{logs}/{name}.rerun.log")
        with open(f"{logs}/{name}.state.json") as handle:
            state = json.load(handle)
        results[name] = {"codes": [code, rerun], "log": open(f"{logs}/{name}.log").read(),
                         "rerun_log": open(f"{logs}/{name}.rerun.log").read(), **state}
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as spec_file:
        print(json.dumps(walk(json.load(spec_file))))
