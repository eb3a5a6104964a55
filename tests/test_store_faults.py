"""A misbehaving object store: a fault proxy on 127.0.0.1 between docembed and SeaweedFS resets
connections (before the store sees a request, and after it answered, so the answer is lost), delays
answers, and answers 500, 503 and SlowDown, on a share of requests chosen by a fixed seed, up to a
bounded count. The run completes through the S3 client's retries, or fails with the cause and is
resumed by the same command; either way the final output equals an uninterrupted run's."""

from __future__ import annotations

import http.server
import os
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.conftest import BUCKET, REPO, by_id, free_port, put_docs, relay

pytestmark = pytest.mark.servers

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
FAULTS = ("reset", "reset-after", "delay", "500", "503", "slowdown")


class FaultProxy(http.server.ThreadingHTTPServer):
    """Forwards each request to ``upstream`` unless the seeded dice pick a fault for it."""

    def __init__(self, upstream: tuple[str, int], seed: int, share: float, limit: int):
        super().__init__(("127.0.0.1", free_port()), _Forward)
        self.upstream, self.share, self.limit = upstream, share, limit
        self.dice = random.Random(seed)
        self.injected = {fault: 0 for fault in FAULTS}
        self.requests = 0
        self.guard = threading.Lock()

    def pick(self) -> str | None:
        with self.guard:
            self.requests += 1
            if sum(self.injected.values()) >= self.limit or self.dice.random() >= self.share:
                return None
            fault = self.dice.choice(FAULTS)
            self.injected[fault] += 1
            return fault


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = self.server.pick()
        if fault == "reset":
            self.close_connection = True
            self.connection.close()
            return
        if fault in ("500", "503", "slowdown"):
            payload = SLOW_DOWN if fault == "slowdown" else b""
            self.send_response(503 if fault != "500" else 500)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if fault == "delay":
            time.sleep(1.0)  # the fault itself (a slow store), not a wait for something to happen
        relay(self, body, drop_answer=fault == "reset-after")  # reset-after: the store did it; the client never hears

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy(s3):
    _, env = s3
    host, port = env["AWS_ENDPOINT_URL"].removeprefix("http://").split(":")
    server = FaultProxy((host, int(port)), seed=20261127, share=0.12, limit=40)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_a_store_that_resets_delays_and_throttles_still_gives_the_exact_output(s3, proxy, docs, tmp_path, capsys):
    fs, env = s3
    ids, texts = docs
    put_docs(fs, "faulty/in/a.parquet", ids[:60], texts[:60])
    base = [sys.executable, "-m", "docembed", "run", "--input", f"s3://{BUCKET}/faulty/in/", "--no-progress",
            "--checkpoint-every", "10"]
    reference = subprocess.run([*base, "--output", str(tmp_path / "reference")], cwd=REPO, capture_output=True,
                               text=True, env={**os.environ, **env, "PYTHONPATH": str(REPO)}, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]

    through = {**os.environ, **env, "PYTHONPATH": str(REPO),
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}"}
    outcomes = []
    for _ in range(4):  # a run that fails with the cause is resumed by the same command
        done = subprocess.run([*base, "--output", f"s3://{BUCKET}/faulty/out"], cwd=REPO, capture_output=True,
                              text=True, env=through, timeout=600)
        outcomes.append(done.returncode)
        if done.returncode == 0:
            break
        assert done.returncode == 1 and "docembed: error: the job failed" in done.stderr, done.stderr[-2000:]
    with capsys.disabled():
        print(f"\nfault proxy: {sum(proxy.injected.values())} faults in {proxy.requests} requests "
              f"({proxy.injected}); run exit codes {outcomes}")
    assert outcomes[-1] == 0 and sum(proxy.injected.values()) >= 10

    import pyarrow.dataset as ds

    from tests.conftest import read_output

    fs.invalidate_cache()
    got = by_id(ds.dataset(f"{BUCKET}/faulty/out", format="parquet", filesystem=fs).to_table())
    want = by_id(read_output(tmp_path / "reference"))
    assert sorted(got) == sorted(want) == sorted(ids[:60])
    assert max(np.abs(got[i] - want[i]).max() for i in want) < 1e-5
