"""Options: Beam flags pass through, ours are validated, typos and impossible requests are errors."""

import pytest

from docembed.pipeline import options
from docembed.cli import main
from docembed.errors import UsageError


@pytest.mark.unit
def test_beam_flags_pass_through_and_ours_parse():
    parsed = options.parse(["--input", "a", "--output", "b", "--runner", "DirectRunner",
                            "--direct_num_workers", "2", "--no-normalize", "--max-batch-size", "128",
                            "--passthrough-columns", "title, url"])
    mine = parsed.view_as(options.EmbedOptions)
    assert (mine.normalize, mine.max_batch_size) == (False, 128)
    assert options.passthrough(mine) == ("title", "url")
    assert parsed.get_all_options()["direct_num_workers"] == 2


@pytest.mark.unit
def test_unknown_flags_and_missing_values_are_all_named():
    with pytest.raises(UsageError) as err:
        options.parse(["--input", "a", "--max-bach-size", "3", "--min-batch-size", "0"])
    message = str(err.value)
    assert "unknown flag --max_bach_size" in message or "unknown flag --max-bach-size" in message
    assert "--output is required" in message and "--min-batch-size 0" in message


@pytest.mark.unit
def test_cuda_without_cuda_is_refused_before_any_work_on_a_local_runner_never_a_fallback(tmp_path, capsys):
    """On a local runner the workers are this machine: the launcher asks its hardware before any work
    and refuses with exit 2, naming it; nothing is written. (Cluster workers refuse in their setup:
    tests/test_dask.py.)"""
    import socket

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["run", "--input", "jobs/sample/docs.parquet", "--output", str(tmp_path / "o"),
                 "--device", "cuda", "--no-progress"])
    assert code == 2 and not (tmp_path / "o").exists()
    err = capsys.readouterr().err
    assert err.count("docembed: error:") == 1
    assert f"worker {socket.gethostname()}: --device cuda was asked for, but torch sees no CUDA device" in err


@pytest.mark.unit
def test_half_precision_on_cpu_is_refused(tmp_path, capsys):
    code = main(["run", "--input", "jobs/sample/docs.parquet", "--output", str(tmp_path / "o"),
                 "--device", "cpu", "--precision", "fp16"])
    assert code == 2
    assert "--precision fp16 is offered on CUDA only" in capsys.readouterr().err


@pytest.mark.unit
def test_threads_are_the_cores_shared_among_local_worker_processes():
    import os

    base = ["--input", "a", "--output", "b"]
    cores = os.cpu_count()
    assert options.threads_per_worker(options.parse(base)) == cores
    two = options.parse(base + ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert options.threads_per_worker(two) == max(1, cores // 2)
    assert options.threads_per_worker(options.parse(base + ["--threads", "3"])) == 3
    assert options.threads_per_worker(options.parse(base + ["--runner", "DataflowRunner"])) == 0


@pytest.mark.unit
def test_every_docembed_flag_takes_its_underscore_spelling_too():
    """Beam users write --checkpoint_every=25; argparse alone would leave it to Beam, which drops it
    with a warning (the run then made 1 unit instead of 4)."""
    import argparse

    parser = argparse.ArgumentParser()
    options.EmbedOptions._add_argparse_args(parser)
    dashed = [s for a in parser._actions for s in a.option_strings if "-" in s[2:] and not s.startswith("--no-")]
    assert dashed and all("--" + s[2:].replace("-", "_") in parser._option_string_actions for s in dashed)
    parsed = options.parse(["--input=a", "--output=b", "--checkpoint_every=25", "--on_duplicate_id", "keep-first",
                            "--passthrough_columns=title", "--chunk_text", "--long_docs=chunks"])
    mine = parsed.view_as(options.EmbedOptions)
    assert (mine.checkpoint_every, mine.on_duplicate_id, mine.chunk_text) == (25, "keep-first", True)
    assert options.passthrough(mine) == ("title",)


@pytest.mark.e2e
def test_the_underscore_spelling_takes_effect_in_a_run(tmp_path, docs):
    from docembed.pipeline.run import run
    from tests.conftest import write_docs

    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:100], texts[:100], row_group_size=25)
    summary = run(["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--no-progress",
                   "--checkpoint_every=25"])
    assert summary["units_total"] == 4 and summary["embedded"] == 100


@pytest.mark.unit
def test_a_misspelt_flag_in_either_spelling_is_refused_with_exit_2(tmp_path, capsys):
    for flag in ("--checkpoint_evry=25", "--checkpoint-evry=25"):
        assert main(["run", "--input", "jobs/sample/docs.parquet", "--output", str(tmp_path / "o"), flag]) == 2
        assert "unknown flag" in capsys.readouterr().err


@pytest.mark.unit
def test_the_dask_runner_by_its_short_name_or_beams_path_with_its_own_flags():
    """Beam registers the Dask flags only once its runner module is imported, and resolves the runner by
    its full path only: docembed does both. One unit per Dask task unless the flags choose otherwise."""
    parsed = options.parse(["--input", "a", "--output", "b", "--runner", "DaskRunner",
                            "--dask_client_address", "scheduler:8786"]).get_all_options()
    assert parsed["runner"] == options.DASK_RUNNER
    assert (parsed["address"], parsed["partition_size"]) == ("scheduler:8786", 1)
    parsed = options.parse(["--input", "a", "--output", "b", f"--runner={options.DASK_RUNNER}",
                            "--dask_npartitions", "4"]).get_all_options()
    assert (parsed["runner"], parsed["npartitions"], parsed["partition_size"]) == (options.DASK_RUNNER, 4, None)
    with pytest.raises(UsageError, match="--dask_client_address apply to --runner DaskRunner only"):
        options.parse(["--input", "a", "--output", "b", "--dask_client_address", "scheduler:8786"])
