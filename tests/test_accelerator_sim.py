"""bench/accelerator_sim.py: the roofline it times a stand-in GPU with, the stand-in's contract (one
device shared by the harness threads, the GIL released while it computes), and one real run through
it, so the simulation cannot silently stop reaching the pipeline's model loop."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import REPO
from tests.test_gpu_check import _load


@pytest.fixture(scope="module")
def sim():
    return _load("accelerator_sim")


@pytest.mark.unit
def test_the_roofline_counts_an_encoders_flops(sim):
    bert = sim.MODELS["bert-base"]
    # 12 layers x (2 x (4 x 768^2 + 2 x 768 x 3072) + 4 x 256 x 768): about 179 MFLOP a token at width 256.
    assert sim.flops_per_token(bert, 256) == 12 * (2 * (4 * 768 * 768 + 2 * 768 * 3072) + 4 * 256 * 768)
    assert sim.flops_per_token(bert, 512) > sim.flops_per_token(bert, 256)  # attention grows with width
    compute = sim.batch_seconds(bert, 256, 256, 1e14, float("inf"))
    assert compute == pytest.approx(256 * 256 * sim.flops_per_token(bert, 256) / 1e14)
    # One short row on a slow memory: reading the weights (2 bytes each) is the longer side.
    assert sim.batch_seconds(bert, 1, 8, 1e14, 1e9) == pytest.approx(2 * bert["params"] / 1e9)


@pytest.mark.unit
def test_the_stand_in_serialises_threads_and_releases_the_gil(sim):
    bert = sim.MODELS["bert-base"]
    rate = 64 * 128 * sim.flops_per_token(bert, 128) / 0.2  # 0.2 s for a batch of 64 x 128
    device = sim.SimulatedDevice(bert, rate, float("inf"), 384)

    class Model:
        dim = 384

    features = {"input_ids": torch.arange(64 * 128).reshape(64, 128)}
    spins, stop = [0], threading.Event()

    def python_work():  # a pure-Python thread: it runs only while the others wait without the GIL
        while not stop.is_set():
            spins[0] += 1

    counter = threading.Thread(target=python_work)
    counter.start()
    results = []
    workers = [threading.Thread(target=lambda: results.append(device.forward_with_norms(Model(), features)))
               for _ in range(2)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    took = time.perf_counter() - started
    stop.set()
    counter.join()
    (a0, a1, _), (b0, b1, _) = sorted(device.intervals)
    assert b0 >= a1 and took >= 0.4  # one device: the second batch waits for the first
    assert spins[0] > 1000
    vectors, norms = results[0]
    assert vectors.shape == (64, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1) and (norms == 1).all()


@pytest.mark.e2e
def test_a_simulated_run_goes_through_the_real_pipeline(tmp_path, sim):
    """The stand-in replaces only the forward pass: every document is read, tokenized, batched,
    written and committed, and the device saw every batch (its busy time is the roofline's)."""
    texts = [("a short text " * (1 + i % 30)) + str(i) for i in range(600)]
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(600)], "text": texts}), tmp_path / "in.parquet")
    job = sim.job_settings()
    spec = {"argv": sim.argv_for(tmp_path / "in.parquet", tmp_path / "out", job), "model": "minilm", "cores": 2,
            "flops_per_s": 1e13, "bytes_per_s": float("inf")}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "accelerator_sim.py"), "--child", json.dumps(spec)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["docs"] == 600 and got["batches"] >= 600 // job["max-batch-size"]
    assert 0 < got["busy"] <= got["window"]
    out = pq.read_table(tmp_path / "out", columns=["id"])
    assert sorted(out.column("id").to_pylist()) == sorted(f"d{i}" for i in range(600))


@pytest.mark.unit
def test_the_gil_count_takes_the_unit_work_and_leaves_out_start_up(sim):
    """py-spy's raw samples ("frames count"): the workers' and helper threads' samples count, at
    GIL_RATE a second; the launcher's main thread, the model load and imports do not."""
    worker = "thread (1): Thread-26;Thread._bootstrap (threading.py:1002);process_bundle (sdk_worker.py:1)"
    raw = "\n".join([
        f"{worker};embed_rows (inference.py:2) 150",
        "thread (2): ThreadPoolExecutor-5_0;Thread._bootstrap (threading.py:1002);first_windows (tokens.py:4) 50",
        f"{worker};EmbedUnit.setup (embed.py:5) 400",
        f"{worker};_find_and_load (<frozen importlib._bootstrap>:6) 30",
        "thread (9): MainThread;<module> (accelerator_sim.py:1);run (run.py:7);build_graph (graph.py:8) 20",
        "thread (9);<module> (accelerator_sim.py:1);unit_id_for (records.py:9) 10",
        " 175",
    ])
    assert sim.gil_seconds(raw) == 200 / sim.GIL_RATE
    tokenizer = next(name for name, _ in sim.GIL_PARTS if "tokenizer" in name)
    assert sim.gil_by_part(raw) == {"other": 150 / sim.GIL_RATE, tokenizer: 50 / sim.GIL_RATE}
