"""Long documents: --long-docs truncate | mean | chunks, window cutting, exact offsets, resume, a 5 MB text."""

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from docembed.pipeline.run import run
from docembed.pipeline.admin.verify import verify
from tests.conftest import REPO, SAMPLE, by_id, read_output, vectors, write_docs
from tests.test_resume import _markers, _wait_for_units
from docembed.transforms.prepare import chunk
from docembed.errors import FingerprintMismatch, UsageError

WINDOW = 254  # all-MiniLM-L6-v2: 256 tokens less [CLS] and [SEP]
OVERLAP = 32


@pytest.fixture(scope="module")
def tokenizer(reference_model):
    return reference_model.tokenizer


def _encode(tokenizer):
    def encode(texts):
        out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(zip(out["input_ids"], out["offset_mapping"]))
    return encode


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _expected_windows(n: int, size: int = WINDOW, overlap: int = OVERLAP) -> int:
    return 1 if n <= size else 1 + math.ceil((n - size) / (size - overlap))


# --- the pure core: cutting windows -------------------------------------------------------------

@pytest.mark.unit
def test_windows_of_single_token_words_are_exactly_the_expected_texts(tokenizer):
    words = "apple bread chair dance eagle fruit grape house india juice kite lemon".split()
    text = " ".join(words)
    tokens = chunk.tokenize([text], _encode(tokenizer))
    assert len(tokens[0]) == len(words)  # each word is one token of MiniLM's vocabulary
    windows = chunk.plan_windows([text], tokens, chunk.ChunkSpec(size=5, overlap=2))
    spans = [text[a:b] for a, b in zip(windows.char_start, windows.char_end)]
    assert spans == ["apple bread chair dance eagle", "dance eagle fruit grape house",
                     "grape house india juice kite", "juice kite lemon"]
    assert windows.chunk.tolist() == [0, 1, 2, 3]
    assert windows.weights.tolist() == [5, 3, 3, 1]  # overlap tokens are counted once


@pytest.mark.unit
def test_offsets_reproduce_each_windows_tokens_on_real_text(tokenizer):
    text = max(pq.read_table(SAMPLE).column("text").to_pylist(), key=len)
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = whole["input_ids"], np.array(whole["offset_mapping"])
    windows = chunk.plan_windows([text], chunk.tokenize([text], _encode(tokenizer)), chunk.ChunkSpec(WINDOW, OVERLAP))
    assert len(windows) == _expected_windows(len(ids)) > 3
    for k, (a, b, cs, ce) in enumerate(zip(windows.token_start, windows.token_end, windows.char_start,
                                            windows.char_end)):
        inside = np.flatnonzero((offsets[:, 0] >= cs) & (offsets[:, 1] <= ce))
        assert inside.tolist() == list(range(a, b))  # text[cs:ce] holds exactly the window's tokens
        assert tokenizer(text[cs:ce], add_special_tokens=False)["input_ids"][1:-1] == ids[a + 1:b - 1]
        assert b - a == (WINDOW if k < len(windows) - 1 else len(ids) - a)
        if k:
            assert windows.token_end[k - 1] - a == OVERLAP
    assert windows.token_start[0] == 0 and windows.token_end[-1] == len(ids)


@pytest.mark.unit
def test_tokenizing_in_pieces_equals_tokenizing_whole(tokenizer):
    texts = pq.read_table(SAMPLE).column("text").to_pylist()
    text = ("\n\n".join(texts) * 4)[:300_000]
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    pieces = chunk.tokenize([text], _encode(tokenizer))[0]  # five 64 KiB pieces
    assert pieces.ids.tolist() == whole["input_ids"]
    assert pieces.starts.tolist() == [a for a, _ in whole["offset_mapping"]]


@pytest.mark.unit
def test_sentence_boundary_ends_windows_at_paragraphs_or_sentences_deterministically(tokenizer):
    texts = pq.read_table(SAMPLE).column("text").to_pylist()
    text = "\n\n".join(texts)[:40_000]
    tokens = chunk.tokenize([text], _encode(tokenizer))
    spec = chunk.ChunkSpec(WINDOW, OVERLAP, "sentence", 64)
    windows = chunk.plan_windows([text], tokens, spec)
    assert windows.chunk.tolist() == chunk.plan_windows([text], tokens, spec).chunk.tolist()
    sizes = windows.token_end - windows.token_start
    assert sizes.max() <= WINDOW and sizes[:-1].min() >= WINDOW - 64
    priority = chunk.boundary_priority(text, tokens[0])
    for s, e in zip(windows.token_start[:-1], windows.token_end[:-1]):
        best = priority[s + WINDOW - 64 - 1:s + WINDOW - 1].max()
        assert priority[e - 1] == best  # the best boundary in reach was taken (0: none, full window)
        if best == chunk.PARAGRAPH:
            assert "\n\n" in text[tokens[0].ends[e - 1]:tokens[0].starts[e]]
        elif best == chunk.SENTENCE:
            assert text[tokens[0].ends[e - 1] - 1] in ".!?"
    assert (priority[windows.token_end[:-1] - 1] > 0).mean() > 0.9  # real prose offers boundaries


@pytest.mark.unit
def test_mean_weights_each_token_once():
    windows = chunk.Windows(*(np.array(v) for v in (
        [0, 0, 0, 1], [0, 1, 2, 0], [0, 4, 8, 0], [6, 10, 12, 3], [0, 0, 0, 0], [0, 0, 0, 0], [6, 4, 2, 3])))
    vecs = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]
    out = chunk.mean_by_document(vecs, windows, 2, normalize=False)
    assert np.allclose(out[0], [6 / 12, 4 / 12, 2 / 12, 0])  # 12 tokens, the 2+2 overlapped ones once
    assert np.allclose(out[1], [0, 0, 0, 1])  # one window: its vector unchanged


# --- end to end, real model ------------------------------------------------------------------------

def _long_and_short(count=16):
    table = pq.read_table(SAMPLE)
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    long = [(i, t) for i, t in zip(ids, texts) if len(t) > 2500][:count]
    short = [(i, t) for i, t in zip(ids, texts) if len(t) < 400][:count]
    chosen = long + short
    return [i for i, _ in chosen], [t for _, t in chosen]


@pytest.fixture(scope="module")
def modes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("long-docs")
    ids, texts = _long_and_short()
    source = write_docs(tmp / "in.parquet", ids, texts, row_group_size=8, title=[f"t-{i}" for i in ids])
    outs, summaries = {}, {}
    for mode, extra in (("truncate", []), ("mean", []), ("chunks", ["--chunk-text"])):
        outs[mode] = tmp / mode
        summaries[mode] = run(["--input", str(source), "--output", str(outs[mode]), "--long-docs", mode,
                               "--checkpoint-every", "8", "--passthrough-columns", "title", "--no-progress",
                               *extra])
    return ids, texts, outs, summaries


@pytest.mark.e2e
def test_each_mode_writes_its_schema_and_counts(modes, tokenizer):
    ids, texts, outs, summaries = modes
    lengths = {i: _token_count(tokenizer, t) for i, t in zip(ids, texts)}
    windows = sum(_expected_windows(n) for n in lengths.values())
    for mode in ("truncate", "mean"):
        table = read_output(outs[mode])
        assert table.column_names == ["id", "embedding", "title"]
        assert sorted(table.column("id").to_pylist()) == sorted(ids)
    chunks = read_output(outs["chunks"])
    assert chunks.column_names == ["id", "chunk", "char_start", "char_end", "embedding", "chunk_text", "title"]
    assert chunks.num_rows == windows == summaries["chunks"]["rows"] == summaries["mean"]["windows"]
    per_id = {}
    for i, k in zip(chunks.column("id").to_pylist(), chunks.column("chunk").to_pylist()):
        per_id.setdefault(i, []).append(k)
    assert {i: sorted(ks) for i, ks in per_id.items()} == {i: list(range(_expected_windows(n)))
                                                         for i, n in lengths.items()}
    text = dict(zip(ids, texts))
    rows = chunks.to_pylist()
    assert all(r["chunk_text"] == text[r["id"]][r["char_start"]:r["char_end"]] for r in rows)
    assert all(r["title"] == f"t-{r['id']}" for r in rows)
    for summary in summaries.values():
        assert summary["embedded"] == len(ids) and summary["text_tokens"] == sum(lengths.values())
    truncated = [n for n in lengths.values() if n > WINDOW]
    assert summaries["truncate"]["truncated"] == len(truncated)
    assert summaries["truncate"]["dropped_tokens"] == sum(n - WINDOW for n in truncated)
    assert summaries["chunks"]["truncated"] == summaries["mean"]["truncated"] == 0
    for out in outs.values():
        assert verify(str(out), str(out.parent / "in.parquet")).problems == []


@pytest.mark.e2e
def test_truncation_over_a_tenth_is_said_plainly(modes):
    from docembed.pipeline.progress import format_summary

    _, _, outs, summaries = modes
    text = format_summary(summaries["truncate"])
    dropped = summaries["truncate"]["dropped_tokens"] / summaries["truncate"]["text_tokens"]
    assert "WARNING" in text and f"{100 * dropped:.0f}% of the text never reached the model" in text
    assert "--long-docs mean or --long-docs chunks" in text
    report = json.loads(next((outs["truncate"] / "_reports").glob("*.json")).read_text())
    assert report["dropped_tokens"] == summaries["truncate"]["dropped_tokens"]
    assert "WARNING" not in format_summary(summaries["chunks"])


@pytest.mark.e2e
def test_estimated_dropped_tokens_leave_the_vectors_alone_and_say_so(modes, tmp_path):
    """--count-dropped estimate (the GPU job's choice): the same vectors byte for byte, the truncated
    count exact, the tokens past the window close to the exact count and marked as estimated in the
    summary, the report and each unit's marker."""
    from docembed.pipeline.progress import format_summary

    ids, _, outs, summaries = modes
    exact = summaries["truncate"]
    summary = run(["--input", str(outs["truncate"].parent / "in.parquet"), "--output", str(tmp_path / "o"),
                   "--checkpoint-every", "8", "--passthrough-columns", "title", "--no-progress",
                   "--count-dropped", "estimate"])
    assert read_output(tmp_path / "o").sort_by("id").equals(read_output(outs["truncate"]).sort_by("id"))
    assert summary["truncated"] == exact["truncated"] > 0 and summary["dropped_estimated"]
    assert summary["dropped_tokens"] != exact["dropped_tokens"]  # estimated, not counted
    assert summary["dropped_tokens"] == pytest.approx(exact["dropped_tokens"], rel=0.05)
    assert summary["text_tokens"] - summary["dropped_tokens"] == exact["text_tokens"] - exact["dropped_tokens"]
    assert f"dropping about {summary['dropped_tokens']} of" in format_summary(summary)
    assert "estimated from characters" in format_summary(summary)
    assert "about" not in format_summary(exact)
    report = json.loads(next((tmp_path / "o" / "_reports").glob("*.json")).read_text())
    assert report["dropped_estimated"] and not json.loads(
        next((outs["truncate"] / "_reports").glob("*.json")).read_text())["dropped_estimated"]
    assert {m["count_dropped"] for m in _markers(tmp_path / "o").values()} == {"estimate"}
    counts = [json.loads((out / "_manifest.json").read_text())["counts"] for out in (tmp_path / "o", outs["truncate"])]
    assert [c["dropped_estimated"] for c in counts] == [True, False]
    assert counts[0]["dropped_tokens"] == summary["dropped_tokens"]
    assert {m["count_dropped"] for m in _markers(outs["truncate"]).values()} == {"exact"}


@pytest.mark.e2e
def test_first_chunk_and_single_window_mean_equal_truncate(modes, tokenizer):
    ids, texts, outs, _ = modes
    truncate, mean = by_id(read_output(outs["truncate"])), by_id(read_output(outs["mean"]))
    chunks = read_output(outs["chunks"])
    first = {i: v for i, k, v in zip(chunks.column("id").to_pylist(), chunks.column("chunk").to_pylist(),
                                     vectors(chunks)) if k == 0}
    single = [i for i, t in zip(ids, texts) if _token_count(tokenizer, t) <= WINDOW]
    assert 0 < len(single) < len(ids)
    for i in ids:  # chunk 0 is the truncate window, token for token
        assert np.allclose(first[i], truncate[i], atol=1e-5)
    for i in single:
        assert np.allclose(mean[i], truncate[i], atol=1e-5)
    assert all(float(mean[i] @ truncate[i]) < 0.999 for i in set(ids) - set(single))


@pytest.mark.e2e
def test_mean_is_the_token_weighted_mean_of_the_chunk_vectors(modes, tokenizer):
    ids, texts, outs, _ = modes
    mean = by_id(read_output(outs["mean"]))
    chunks = read_output(outs["chunks"]).sort_by([("id", "ascending"), ("chunk", "ascending")])
    vecs, chunk_ids = vectors(chunks), np.array(chunks.column("id").to_pylist())
    checked = 0
    for i, text in zip(ids, texts):
        n = _token_count(tokenizer, text)
        if n <= WINDOW:
            continue
        # Window k ends at token min(WINDOW + k (WINDOW - OVERLAP), n); it adds the tokens after the
        # previous window's end, so the overlapped ones weigh once.
        ends = np.minimum(WINDOW + np.arange(_expected_windows(n)) * (WINDOW - OVERLAP), n)
        weights = np.diff(np.concatenate([[0], ends]))
        expected = (vecs[chunk_ids == i] * weights[:, None]).sum(0)
        assert np.allclose(mean[i], expected / np.linalg.norm(expected), atol=1e-5), i
        checked += 1
    assert checked >= 5


@pytest.mark.e2e
def test_settings_that_change_windows_refuse_to_resume(modes):
    ids, _, outs, _ = modes
    source = str(outs["chunks"].parent / "in.parquet")
    base = ["--input", source, "--checkpoint-every", "8", "--passthrough-columns", "title", "--no-progress"]
    with pytest.raises(FingerprintMismatch, match="long_docs: 'chunks' -> 'mean'"):
        run(base + ["--output", str(outs["chunks"]), "--long-docs", "mean"])
    with pytest.raises(FingerprintMismatch, match="chunk_overlap: 32 -> 16"):
        run(base + ["--output", str(outs["chunks"]), "--long-docs", "chunks", "--chunk-text", "--chunk-overlap", "16"])
    with pytest.raises(FingerprintMismatch, match="chunk_text: True -> False"):
        run(base + ["--output", str(outs["chunks"]), "--long-docs", "chunks"])
    again = run(base + ["--output", str(outs["chunks"]), "--long-docs", "chunks", "--chunk-text"])
    assert again["units_skipped"] == again["units_total"] and again["embedded"] == 0


@pytest.mark.parametrize("flags, message", [
    (["--chunk-overlap", "8"], "--chunk-overlap apply to --long-docs mean or chunks, not truncate"),
    (["--long-docs", "mean", "--chunk-text"], "--chunk-text applies to --long-docs chunks only"),
    (["--long-docs", "chunks", "--count-dropped", "estimate"], "--count-dropped applies to --long-docs truncate"),
    (["--long-docs", "chunks", "--boundary-lookback", "9"], "--boundary-lookback applies to --chunk-boundary"),
    (["--long-docs", "chunks", "--chunk-overlap", "254"], "must be below the 254 tokens a window holds"),
    (["--long-docs", "chunks", "--passthrough-columns", "chunk"], "these names are the output's own columns"),
])
@pytest.mark.unit
def test_window_flags_are_checked(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        run(["--input", str(SAMPLE), "--output", str(tmp_path / "o"), "--no-progress", *flags])


@pytest.mark.e2e
def test_verify_finds_a_lost_or_repeated_chunk(modes, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(modes[2]["chunks"], out)
    part = max(out.glob("part-*.parquet"), key=lambda p: pq.read_metadata(p).num_rows)
    table = pq.read_table(part)
    chunk_one = np.flatnonzero(np.array(table.column("chunk").to_pylist()) == 1)[0]
    keep = np.ones(table.num_rows, dtype=bool)
    keep[chunk_one] = False
    pq.write_table(table.filter(keep), part)
    problems = " ".join(verify(str(out)).problems)
    assert "1 id has gaps in its chunk indices" in problems
    pq.write_table(table.take(list(range(table.num_rows)) + [0]), part)
    problems = " ".join(verify(str(out)).problems)
    assert "1 id has a chunk index more than once" in problems


# --- resume and a 5 MB document, as the CLI runs them ----------------------------------------------

@pytest.mark.e2e
def test_sigkill_then_rerun_in_chunks_mode_equals_an_uninterrupted_run(tmp_path):
    table = pq.read_table(SAMPLE)
    rows = [r for r in table.to_pylist() if len(r["text"]) > 600][:60]
    source = write_docs(tmp_path / "in.parquet", [r["id"] for r in rows], [r["text"] for r in rows], row_group_size=5)
    out = tmp_path / "resumed"
    command = [sys.executable, "-m", "docembed", "run", "--input", str(source), "--output", str(out),
               "--long-docs", "chunks", "--checkpoint-every", "5", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_units(out, proc, 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _markers(out)
    assert 2 <= len(at_kill) < 12, "the run finished before it could be killed"
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{12 - len(at_kill)} committed this run, {len(at_kill)} already done" in rerun.stdout
    assert all(_markers(out)[u]["run_id"] == m["run_id"] for u, m in at_kill.items())

    straight = tmp_path / "straight"
    run(["--input", str(source), "--output", str(straight), "--long-docs", "chunks", "--checkpoint-every", "5",
         "--no-progress"])
    key = [("id", "ascending"), ("chunk", "ascending")]
    resumed, reference = read_output(out).sort_by(key), read_output(straight).sort_by(key)
    assert resumed.drop(["embedding"]).equals(reference.drop(["embedding"]))
    assert np.allclose(vectors(resumed), vectors(reference), atol=1e-6)
    assert verify(str(out), str(source)).problems == []


@pytest.mark.e2e
def test_a_5_mb_document_flows_through_ordinary_batches_in_bounded_memory(tmp_path, tiny_window_model):
    texts = pq.read_table(SAMPLE).column("text").to_pylist()
    big = ("\n\n".join(texts) * 60)[:5_000_000]
    source = write_docs(tmp_path / "in.parquet", ["big"] + [f"d{i}" for i in range(50)], [big] + texts[:50])
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "docembed", "run", "--input", str(source), "--output", str(out), "--model",
         tiny_window_model, "--long-docs", "chunks", "--chunk-overlap", "16", "--no-progress"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    table = read_output(out).sort_by([("id", "ascending"), ("chunk", "ascending")])
    rows = table.filter(table.column("id").to_numpy(zero_copy_only=False) == "big")
    starts, ends = rows.column("char_start").to_numpy(), rows.column("char_end").to_numpy()
    assert starts[0] == 0 and ends[-1] == len(big.rstrip())
    assert (starts[1:] < ends[:-1]).all() and (starts[1:] > starts[:-1]).all()  # overlapping, advancing
    assert rows.num_rows > 10_000 and rows.column("chunk").to_pylist() == list(range(rows.num_rows))
    report = json.loads(next((out / "_reports").glob("*.json")).read_text())
    assert report["batches"] <= math.ceil(table.num_rows / 64)  # its windows filled ordinary batches
    # Copying the text per window (11,000+ copies of 5 MB) would need tens of GiB. Measured alone: about
    # 0.75 GiB; once, inside a full suite run on a loaded machine, 1.6 GiB (not reproduced since).
    assert report["peak_rss_mib"] < 3072, report["peak_rss_mib"]
