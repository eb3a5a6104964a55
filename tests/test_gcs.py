"""GCS: a run from gs:// to gs:// through gcsfs, against fake-gcs-server (started by the test)."""

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from docembed.pipeline.run import run

pytestmark = pytest.mark.servers


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
