"""Options: Beam flags pass through, ours are validated, typos and impossible requests are errors."""

import pytest

from pipeline import options
from pipeline.cli import main
from transforms.errors import UsageError


def test_beam_flags_pass_through_and_ours_parse():
    parsed = options.parse(["--input", "a", "--output", "b", "--runner", "DirectRunner",
                            "--direct_num_workers", "2", "--no-normalize", "--max-batch-size", "128",
                            "--passthrough-columns", "title, url"])
    mine = parsed.view_as(options.EmbedOptions)
    assert (mine.normalize, mine.max_batch_size) == (False, 128)
    assert options.passthrough(mine) == ("title", "url")
    assert parsed.get_all_options()["direct_num_workers"] == 2


def test_unknown_flags_and_missing_values_are_all_named():
    with pytest.raises(UsageError) as err:
        options.parse(["--input", "a", "--max-bach-size", "3", "--min-batch-size", "0"])
    message = str(err.value)
    assert "unknown flag --max_bach_size" in message or "unknown flag --max-bach-size" in message
    assert "--output is required" in message and "--min-batch-size 0" in message


def test_cuda_without_cuda_fails_on_the_worker_naming_it_never_a_fallback(tmp_path, capsys):
    """The launcher does not look for a GPU (on a cluster it has none); the worker, here the same
    machine, does, in its setup, before any unit is embedded."""
    import socket

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["run", "--input", "jobs/sample/docs.parquet", "--output", str(tmp_path / "o"),
                 "--device", "cuda", "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"worker {socket.gethostname()}: --device cuda was asked for, but torch sees no CUDA device" in err
    assert not list((tmp_path / "o").glob("part-*"))


def test_half_precision_on_cpu_is_refused(tmp_path, capsys):
    code = main(["run", "--input", "jobs/sample/docs.parquet", "--output", str(tmp_path / "o"),
                 "--device", "cpu", "--precision", "fp16"])
    assert code == 2
    assert "--precision fp16 is offered on CUDA only" in capsys.readouterr().err


def test_threads_are_the_cores_shared_among_local_worker_processes():
    import os

    base = ["--input", "a", "--output", "b"]
    cores = os.cpu_count()
    assert options.threads_per_worker(options.parse(base)) == cores
    two = options.parse(base + ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert options.threads_per_worker(two) == max(1, cores // 2)
    assert options.threads_per_worker(options.parse(base + ["--threads", "3"])) == 3
    assert options.threads_per_worker(options.parse(base + ["--runner", "DataflowRunner"])) == 0
