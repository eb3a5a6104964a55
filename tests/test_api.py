"""docembed in a user's own Beam pipeline: EmbedDocuments over dicts and Rows, vectors as docembed run's."""

import re

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that

from docembed.pipeline.api import EmbedDocuments
from tests.conftest import REPO, cosine


@pytest.mark.e2e
def test_the_readme_example_runs_as_written(capsys):
    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "EmbedDocuments(" in b)
    exec(compile(block, "README.md", "exec"), {})
    assert sorted(capsys.readouterr().out.split("\n")[:2]) == ["a 384", "b 384"]


@pytest.mark.e2e
def test_dicts_and_rows_keep_their_fields_and_get_sentence_transformers_vectors(docs, reference_model):
    ids, texts = docs
    reference = dict(zip(ids, reference_model.encode(texts)))

    def matches(expected_ids):
        def check(elements):  # runs on the worker: everything it needs travels with it
            fields = [e if isinstance(e, dict) else e._asdict() for e in elements]
            assert all(set(f) == {"id", "body", "vector"} for f in fields)
            assert sorted(f["id"] for f in fields) == sorted(expected_ids)
            got = np.stack([np.asarray(f["vector"], dtype=np.float32) for f in fields])
            assert cosine(got, np.stack([reference[f["id"]] for f in fields])).min() >= 0.9999
        return check

    with beam.Pipeline() as p:
        dicts = p | "Dicts" >> beam.Create([{"id": i, "body": t} for i, t in zip(ids[:60], texts[:60])])
        rows = p | "Rows" >> beam.Create([beam.Row(id=i, body=t) for i, t in zip(ids[60:90], texts[60:90])])
        for name, elements, expected in (("dicts", dicts, ids[:60]), ("rows", rows, ids[60:90])):
            embedded = elements | f"Embed {name}" >> EmbedDocuments(text_field="body", embedding_field="vector",
                                                                    buffer_size=25, min_batch_size=8)
            assert_that(embedded, matches(expected), label=f"Check {name}")


@pytest.mark.unit
def test_an_element_without_text_fails_the_pipeline_naming_the_field():
    with pytest.raises(Exception, match="EmbedDocuments: an element has no text in field 'text' \\(found NoneType\\)"):
        with beam.Pipeline() as p:
            _ = p | beam.Create([{"id": "a", "text": None}]) | EmbedDocuments(min_batch_size=1)


@pytest.mark.e2e
def test_the_readme_embed_parquet_example_runs_and_resumes_as_docembed_run_does(tmp_path, docs, monkeypatch,
                                                                                 capsys, reference_model):
    from docembed.cli import main
    from tests.conftest import by_id, read_output, write_docs

    ids, texts = docs
    write_docs(tmp_path / "docs.parquet", ids[:250], texts[:250], row_group_size=50)
    monkeypatch.chdir(tmp_path)
    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "EmbedParquet(" in b)
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip().endswith("250 embedded, 3 units")
    got = by_id(read_output(tmp_path / "embedded"))
    assert sorted(got) == sorted(ids[:250])
    expected = reference_model.encode(texts[:250])
    assert cosine(np.stack([got[i] for i in ids[:250]]), expected).min() >= 0.9999
    assert main(["verify", "--output", "embedded/", "--input", "docs.parquet"]) == 0
    # Entered again: everything is done, nothing is redone, and the command agrees.
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip().endswith("0 embedded, 0 units")
    assert main(["run", "--input", "docs.parquet", "--output", "embedded/", "--checkpoint-every", "100",
                 "--no-progress"]) == 0
    assert "0 committed this run, 3 already done" in capsys.readouterr().out


@pytest.mark.unit
def test_embed_parquet_outside_its_block_is_refused(tmp_path, docs):
    from docembed.pipeline.api import EmbedParquet

    with pytest.raises(Exception, match="apply EmbedParquet inside `with EmbedParquet"):
        with beam.Pipeline() as p:
            _ = p | EmbedParquet(str(tmp_path / "in.parquet"), str(tmp_path / "out"))


@pytest.mark.unit
def test_embed_documents_options_are_checked_as_the_commands_are():
    from docembed.errors import UsageError

    with pytest.raises(UsageError, match="--prefix and --prompt-name both give the text before each document"):
        EmbedDocuments(prefix="query: ", prompt_name="query")
    with pytest.raises(UsageError, match="--min-batch-size 0 must be >= 1"):
        EmbedDocuments(min_batch_size=0)
