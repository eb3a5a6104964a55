"""No secrets in what docembed writes: a credential carried in an input URL (here the user and
password of an HTTP server that demands them) or in the environment never reaches the output, its
manifest, markers, rejections, plan or reports, nor anything docembed prints; it is still what the
workers read the input with."""

import base64
import http.server
import io
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from docembed.cli import main
from tests.conftest import free_port, read_output

pytestmark = pytest.mark.e2e

SECRET = "s3cret-canary"


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` to requests with the right basic-auth credentials, with byte ranges."""

    files: dict = {}
    auth = "Basic " + base64.b64encode(f"reader:{SECRET}".encode()).decode()

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        if self.headers.get("Authorization") != self.auth:
            self.send_response(401)
            self.end_headers()
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.end_headers()
            return
        start, end = 0, len(data) - 1
        if self.headers.get("Range", "").startswith("bytes="):
            first, _, last = self.headers["Range"][6:].partition("-")
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if body:
            self.wfile.write(data[start:end + 1])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


def _everything_written(folder) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_a_password_in_the_input_url_and_a_key_in_the_environment_never_reach_the_output_or_the_terminal(
        server, tmp_path, docs, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"env-{SECRET}")
    ids, texts = docs
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": ids[:12], "text": ["", *texts[1:12]]}), sink)  # one rejection names its source
    _Files.files = {"/corpus/a.parquet": sink.getvalue()}
    port = server.server_address[1]
    url = f"http://reader:{SECRET}@127.0.0.1:{port}/corpus/a.parquet"
    out = tmp_path / "out"
    assert main(["run", "--input", url, "--output", str(out), "--no-progress", "--checkpoint-every", "6"]) == 0
    assert main(["status", "--output", str(out)]) == 0
    assert main(["verify", "--output", str(out), "--input", url]) == 0
    assert main(["report", "--output", str(out)]) == 0
    assert main(["run", "--input", url.replace("a.parquet", "missing.parquet"), "--output", str(out)]) == 2
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err
    assert f"http://127.0.0.1:{port}/corpus/missing.parquet" in printed.err  # named, without the password
    assert SECRET.encode() not in _everything_written(out)
    assert sorted(read_output(out).column("id").to_pylist()) == sorted(ids[1:12])
    assert [r["source"] for r in pq.read_table(out / "_rejects").to_pylist()] == [
        f"http://127.0.0.1:{port}/corpus/a.parquet"]
