"""Job files: every file in jobs/ parses and builds the Beam graph with its options (without
submitting it), and flags after --job override the file's."""

from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.runners.direct.direct_runner import DirectRunner

from docembed.cli import main
from docembed.pipeline.graph import JobPlan, build_dedup_graph, build_graph
from docembed.pipeline.jobs import expand_job, job_flags, relative_to_job
from docembed.pipeline.run import prepare
from tests.conftest import REPO, SAMPLE, read_output, write_docs
from docembed.errors import UsageError

JOBS = sorted((REPO / "jobs").glob("*.yaml"))


@pytest.mark.unit
def test_there_are_job_files_for_each_runner():
    assert {p.stem for p in JOBS} >= {"local", "dataflow-gpu", "dataflow-cpu-spot", "flink", "spark"}


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
@pytest.mark.unit
def test_each_job_file_dry_runs_and_builds_its_graph_on_this_cpu_launcher(job, tmp_path, capsys):
    """As a laptop would launch it: no GPU and no cloud here, yet the GPU job plans, describes its
    model and builds its graph with --device cuda kept for the workers to honour."""
    argv = ["--job", str(job), "--input", str(SAMPLE), "--output", str(tmp_path / "out")]
    assert main(["run", *argv, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "dry run; nothing was written or submitted" in printed and "400 rows" in printed
    assert not (tmp_path / "out").exists()
    options, _, _, _, settings = prepare(expand_job(argv))  # rejects any flag Beam or docembed does not know
    flags = job_flags(str(job))
    assert settings.device == next((f.split("=")[1] for f in flags if f.startswith("--device=")), "auto")
    assert f"--device {settings.device}" in printed
    plan = JobPlan(["_plans/run/units-00000.jsonl"], ["_plans/run/output-00000.jsonl"], ([], []))
    for build, steps in [(build_dedup_graph, {"ExpandPlan", "ExpandOutput", "FindDuplicates"}),
                         (build_graph, {"ExpandPlan", "ReadUnit", "EmbedUnit", "CommitUnit"})]:
        pipeline = beam.Pipeline(runner=DirectRunner(), options=options)
        build(pipeline, plan, settings)
        proto = pipeline.to_runner_api()  # serialises every step, as submitting would
        assert steps <= {t.unique_name for t in proto.components.transforms.values()}


@pytest.mark.e2e
def test_flags_after_the_job_file_override_it(tmp_path):
    write_docs(tmp_path / "in.parquet", ["a", "b"], ["first document", "second document"])
    argv = ["run", "--job", str(REPO / "jobs" / "local.yaml"), "--input", str(tmp_path / "in.parquet"),
            "--output", str(tmp_path / "out"), "--passthrough-columns", "", "--no-progress"]
    assert main(argv) == 0
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == ["a", "b"]


@pytest.mark.unit
def test_a_bad_job_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("docembed:\n  input: [unclosed\n")
    with pytest.raises(UsageError, match="is not valid YAML"):
        expand_job(["--job", str(bad)])
    bad.write_text("options:\n  input: x\n")
    with pytest.raises(UsageError, match="unknown sections"):
        expand_job(["--job", str(bad)])
    assert expand_job(["--input", "x"]) == ["--input", "x"]
    assert Path(JOBS[0]).exists()


@pytest.mark.unit
def test_yaml_booleans_become_the_flags_beam_and_docembed_really_have(tmp_path):
    """false is Beam's --no_use_public_ips and docembed's --no-progress; a flag that is off by default
    gives nothing; a flag that takes a value gets the word."""
    from docembed.pipeline.options import EmbedOptions, parse

    job = tmp_path / "job.yaml"
    job.write_text("docembed:\n  progress: false\n  normalize: false\n  chunk-text: false\n  overwrite: true\n"
                   "beam:\n  use_public_ips: false\n  save_main_session: true\n  streaming: false\n")
    flags = job_flags(str(job))
    assert flags == ["--no-progress", "--no-normalize", "--overwrite", "--no_use_public_ips", "--save_main_session"]
    parsed = parse(flags + ["--input", "a", "--output", "b"])
    mine, beam_options = parsed.view_as(EmbedOptions), parsed.get_all_options()
    assert (mine.progress, mine.normalize, mine.chunk_text, mine.overwrite) == (False, False, False, True)
    assert (beam_options["use_public_ips"], beam_options["save_main_session"]) == (False, True)
    job.write_text("beam:\n  experiments: false\n  bogus_flag: false\n")
    with pytest.raises(UsageError, match="unknown flag --bogus_flag"):
        job_flags(str(job))


def _job(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.yaml").write_text(text)
    return folder / "job.yaml"


def _values(flags: list[str]) -> dict[str, str]:
    return dict(flag[2:].split("=", 1) for flag in flags if "=" in flag)


@pytest.mark.unit
def test_relative_paths_in_a_job_file_are_relative_to_its_folder_from_any_directory(tmp_path, monkeypatch):
    """As cron runs it: the working directory is not the job's, and the job file is named relatively
    or absolutely; either way the paths are the job folder's, made absolute."""
    jobs = tmp_path / "srv" / "jobs"
    _job(jobs, "docembed:\n  input: inbox/*.parquet\n  output: ../embeddings/\n  model: ./models/mine\n"
               "  checkpoint_every: 10\nbeam:\n  setup_file: ../setup.py\n  requirements_file: reqs.txt\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    want = {"input": f"{jobs}/inbox/*.parquet", "output": f"{tmp_path}/srv/embeddings/",
            "model": f"{jobs}/models/mine", "checkpoint_every": "10",
            "setup_file": f"{tmp_path}/srv/setup.py", "requirements_file": f"{jobs}/reqs.txt"}
    for named in (str(jobs / "job.yaml"), "../srv/jobs/job.yaml", "../srv/jobs/../jobs/job.yaml"):
        assert _values(job_flags(named)) == want, named


@pytest.mark.unit
def test_a_folder_input_keeps_its_slash_and_both_spellings_count(tmp_path):
    job = _job(tmp_path / "jobs", "docembed:\n  input: ../b/\n  model: ../models/m/\n")
    assert _values(job_flags(str(job))) == {"input": f"{tmp_path}/b/", "model": f"{tmp_path}/models/m/"}
    folder = str(tmp_path / "jobs")
    assert relative_to_job({"setup-file": "s.py", "requirements-file": "r.txt", "output": "o"}, folder) == {
        "setup-file": f"{folder}/s.py", "requirements-file": f"{folder}/r.txt", "output": f"{folder}/o"}


@pytest.mark.unit
def test_urls_absolute_paths_hub_ids_and_other_options_stay_as_written(tmp_path):
    job = _job(tmp_path / "jobs", "docembed:\n  input: s3://bucket/docs/\n  output: /data/embeddings/\n"
                                  "  model: BAAI/bge-base-en-v1.5\n  text-column: body/text\n"
                                  "  passthrough-columns: a/b,c\nbeam:\n  setup_file: /srv/app/setup.py\n"
                                  "  temp_location: tmp/\n  requirements_file: file:///srv/reqs.txt\n")
    assert _values(job_flags(str(job))) == {
        "input": "s3://bucket/docs/", "output": "/data/embeddings/", "model": "BAAI/bge-base-en-v1.5",
        "text-column": "body/text", "passthrough-columns": "a/b,c", "setup_file": "/srv/app/setup.py",
        "temp_location": "tmp/", "requirements_file": "file:///srv/reqs.txt"}
    job.write_text("docembed:\n  input: memory://docs/x.parquet\n  model: models/mine\n")  # no ./: a hub id
    assert _values(job_flags(str(job))) == {"input": "memory://docs/x.parquet", "model": "models/mine"}


@pytest.mark.unit
def test_flags_after_the_job_file_stay_relative_to_the_working_directory(tmp_path):
    from docembed.pipeline.options import EmbedOptions, parse

    job = _job(tmp_path / "jobs", "docembed:\n  input: in.parquet\n  output: out/\n")
    argv = expand_job(["--job", str(job), "--output", "mine/", "--input=here.parquet", "--model", "./m"])
    assert argv == [f"--input={tmp_path}/jobs/in.parquet", f"--output={tmp_path}/jobs/out/",
                    "--output", "mine/", "--input=here.parquet", "--model", "./m"]
    opts = parse(argv).view_as(EmbedOptions)
    assert (opts.input, opts.output, opts.model) == ("here.parquet", "mine/", "./m")


@pytest.mark.unit
def test_the_repositorys_local_jobs_read_the_bundled_sample_and_write_beside_jobs(tmp_path, monkeypatch):
    """`make run` (from the repository root) and a crontab line (from anywhere) run the same job."""
    monkeypatch.chdir(tmp_path)
    for name, out in [("local", "out/"), ("local-chunks", "out-chunks/"), ("local-multiprocess", "out-mp/")]:
        values = _values(job_flags(str(REPO / "jobs" / f"{name}.yaml")))
        assert (values["input"], values["output"]) == (str(SAMPLE), f"{REPO}/{out}")
    monkeypatch.chdir(REPO)
    assert _values(job_flags("jobs/local.yaml"))["output"] == f"{REPO}/out/"
    for name in ("dataflow-gpu", "dataflow-cpu-spot"):
        assert _values(job_flags(str(REPO / "jobs" / f"{name}.yaml")))["setup_file"] == str(REPO / "setup.py")
