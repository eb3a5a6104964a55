"""One output never mixes numerics: the first commit pins the output's device and precision, every
later commit must match, and the launcher adopts the output's for ``auto`` and refuses others."""

import json

import pyarrow as pa
import pytest

from docembed.pipeline.guard import adopt_numerics
from docembed.store.admin import OutputAdmin
from docembed.pipeline.run import run
from tests.conftest import bare_settings, write_docs
from docembed.transforms import rejects
from docembed.store.units import UnitStore
from docembed.transforms.commit import commit_unit
from docembed.errors import FingerprintMismatch, NumericsMismatch
from docembed.records import UnitEmbeddings, WorkUnit

CPU = {"device": "cpu", "precision": "fp32", "host": "worker-a", "libraries": {"torch": "2.13.0"}}
GPU = {"device": "cuda", "precision": "fp16", "host": "worker-b", "gpu": "NVIDIA L4", "libraries": {"torch": "2.13.0"}}


@pytest.mark.unit
def test_the_first_commit_pins_the_output_and_a_worker_with_other_numerics_refuses_to_commit(tmp_path):
    first, second = UnitStore(str(tmp_path)), UnitStore(str(tmp_path))
    first.check_numerics(CPU)
    assert json.loads((tmp_path / "_numerics.json").read_text()) == CPU
    first.check_numerics(dict(CPU, host="worker-c"))  # another CPU worker at fp32: the same numbers
    with pytest.raises(NumericsMismatch) as refused:
        second.check_numerics(GPU)
    message = str(refused.value)
    assert "worker worker-b would commit vectors made at cuda fp16 on worker-b (NVIDIA L4" in message
    assert "holds vectors made at cpu fp32 on worker-a" in message


@pytest.mark.unit
def test_a_refused_commit_publishes_nothing(tmp_path):
    UnitStore(str(tmp_path)).check_numerics(GPU)
    unit = WorkUnit(str(tmp_path / "in.parquet"), "f", 0, 1, (0,))
    done = UnitEmbeddings(unit, pa.table({"id": ["a"]}), rejects.empty(), pa.array([[0.0]]).to_numpy(False),
                          0, 0, 0, 0, numerics=CPU)
    with pytest.raises(NumericsMismatch):
        commit_unit(done, None, UnitStore(str(tmp_path)))
    assert not list(tmp_path.glob("part-*")) and not (tmp_path / "_checkpoints").exists()


@pytest.mark.e2e
def test_auto_adopts_the_outputs_numerics_and_an_explicit_other_request_is_refused(tmp_path, docs):
    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:4], texts[:4])
    argv = ["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--no-progress"]
    first = run(argv)
    marker = next(iter(OutputAdmin(str(tmp_path / "out")).done_markers().values()))
    assert (marker["numerics"]["device"], marker["numerics"]["precision"]) == ("cpu", "fp32")
    assert set(marker["numerics"]["libraries"]) == {"torch", "transformers", "tokenizers"}
    output = OutputAdmin(str(tmp_path / "out"))
    settings = adopt_numerics(output, first["settings"], output.read_manifest())
    assert (settings.device, settings.precision) == ("cpu", "fp32")
    with pytest.raises(FingerprintMismatch, match=r"--precision bf16 \(the output's: fp32\): one output never mixes"):
        run(argv + ["--precision", "bf16"])


@pytest.mark.unit
def test_an_output_written_before_numerics_were_pinned_is_read_from_its_manifest(tmp_path):
    """Older outputs kept the precision in the fingerprint and the device in the manifest's settings."""
    output = OutputAdmin(str(tmp_path))
    output.write_manifest({"fingerprint": {"precision": "fp32"}, "settings": {"device": "cpu"}})
    output.mark_done("u", {"unit_id": "u"})
    adopted = adopt_numerics(output, bare_settings(str(tmp_path)), output.read_manifest())
    assert (adopted.device, adopted.precision) == ("cpu", "fp32")


@pytest.mark.e2e
def test_verify_reports_parts_made_at_other_numerics_than_the_outputs(tmp_path, docs):
    from docembed.pipeline.admin.verify import verify

    ids, texts = docs
    write_docs(tmp_path / "in.parquet", ids[:4], texts[:4])
    run(["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--no-progress"])
    assert verify(str(tmp_path / "out")).problems == []
    (tmp_path / "out" / "_numerics.json").write_text(json.dumps(GPU))  # as if another machine had pinned it
    problems = verify(str(tmp_path / "out")).problems
    assert len(problems) == 1 and "made at cpu fp32" in problems[0] and "vectors are cuda fp16" in problems[0]


@pytest.mark.e2e
def test_an_output_of_the_earlier_layout_resumes_and_gets_its_numerics_pinned(tmp_path, docs):
    """Outputs written before numerics had their own record kept the precision in the fingerprint
    (manifest and parts) and no _numerics.json: they resume, and verify still passes."""
    import pyarrow.parquet as pq

    from docembed.pipeline.admin.verify import verify

    ids, texts = docs
    write_docs(tmp_path / "in" / "day1.parquet", ids[:4], texts[:4])
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress"]
    run(argv)
    out = tmp_path / "out"
    manifest = json.loads((out / "_manifest.json").read_text())
    manifest["fingerprint"]["precision"] = "fp32"
    manifest["settings"]["device"] = "cpu"
    (out / "_manifest.json").write_text(json.dumps(manifest))
    for part in out.glob("part-*.parquet"):
        table = pq.read_table(part)
        metadata = dict(table.schema.metadata)
        fingerprint = json.loads(metadata[b"docembed.fingerprint"])
        metadata[b"docembed.fingerprint"] = json.dumps({**fingerprint, "precision": "fp32"}).encode()
        del metadata[b"docembed.numerics"]
        pq.write_table(table.replace_schema_metadata(metadata), part)
    for marker in out.glob("_checkpoints/*.json"):  # older markers recorded neither
        record = json.loads(marker.read_text())
        del record["numerics"], record["part_bytes"]
        marker.write_text(json.dumps(record))
    (out / "_numerics.json").unlink()
    write_docs(tmp_path / "in" / "day2.parquet", ids[4:8], texts[4:8])
    summary = run(argv)
    assert (summary["embedded"], summary["skipped"]) == (4, 4)
    assert json.loads((out / "_numerics.json").read_text())["precision"] == "fp32"
    assert verify(str(out), str(tmp_path / "in")).problems == []
