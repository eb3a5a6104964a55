"""Two launchers racing for an output's lock, 20 times, on local disk, S3 (SeaweedFS: a conditional
PUT) and GCS (fake-gcs-server: the generation precondition). Both processes are held at the moment
before the exclusive create, after each found no lock, and released together (a fault gate), so the
race is run the same way every time: exactly one takes the lock, the other gets LockHeld, exit code 75."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import BUCKET, REPO, wait_for

ROUNDS = 20
RACER = """
import sys
from docembed.pipeline.lock import OutputLock
from docembed.store.admin import OutputAdmin
from docembed.errors import LockHeld

output = OutputAdmin(sys.argv[1])
for line in sys.stdin:
    try:
        lock = OutputLock(output, ttl_s=60).__enter__()
    except LockHeld as exc:
        print(f"held {exc.exit_code}", flush=True)
        continue
    print("took", flush=True)
    sys.stdin.readline()  # hold it until the test has seen both answers
    lock.__exit__(None, None, None)
    print("released", flush=True)
"""


def _race(url: str, env: dict, gate) -> None:
    env = {**os.environ, **env, "PYTHONPATH": str(REPO), "DOCEMBED_FAULT": "publish:lock@*:pause",
           "DOCEMBED_FAULT_GATE": str(gate)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, url], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for round_ in range(1, ROUNDS + 1):
            for racer in racers:
                racer.stdin.write("go\n")
                racer.stdin.flush()
            wait_for(lambda: len(list(gate.parent.glob(f"{gate.name}.arrived.*.{round_}"))) >= 2,  # both found no lock
                     timeout=60, proc=racers, interval=0.01, what=f"both racers at the lock's create in round {round_}")
            (gate.parent / f"{gate.name}.{round_}").touch()  # release both at once
            answers = [racer.stdout.readline().strip() for racer in racers]
            assert sorted(answers) == ["held 75", "took"], f"round {round_}: {answers}"
            winner = racers[answers.index("took")]
            winner.stdin.write("release\n")
            winner.stdin.flush()
            assert winner.stdout.readline().strip() == "released"
    finally:
        for racer in racers:
            racer.stdin.close()
            racer.wait(timeout=60)


@pytest.mark.unit
def test_local_disk(tmp_path):
    _race(str(tmp_path / "out"), {}, tmp_path / "gate")


@pytest.mark.servers
def test_s3_conditional_put(s3, tmp_path):
    _, env = s3
    _race(f"s3://{BUCKET}/race", env, tmp_path / "gate")


@pytest.mark.servers
def test_gcs_generation_precondition(gcs, tmp_path):
    env = {k: os.environ[k] for k in ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
    _race("gs://docembed-bucket/race", env, tmp_path / "gate")
