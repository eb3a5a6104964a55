"""False positives of the drift line: how often runs drawn from one corpus are flagged by chance.

    python bench/drift_false_positives.py --trials 2000 --out bench/results/drift_false_positives.txt

The bundled corpus (jobs/sample/docs.parquet, 400 docstrings) is embedded once with the default model
through the workers' own code (``inference.embed_rows``, ``quality.mostly_non_letters``, the reader's
empty-text rule), keeping per document its length in tokens, whether it is truncated, mostly
non-letters or rejected, its norm before normalisation and its vector. Each trial then draws an
earlier history of 6 runs and one run "now" from the same documents, builds each run's record exactly
as the launcher does (``quality.unit_stats`` on the run's one unit, its marker, ``drift.run_quality``)
and compares the run now with the 6 before (``drift.compare``). All runs come from one distribution,
so every flag is a false positive.

Run sizes are drawn log-uniformly from 5 to 2,000 documents, each run's on its own. The corpus holds 400
documents, fewer than 7 runs of 2,000, so two designs:

- ``iid``: each run's documents are drawn with replacement from the corpus: every run is a sample of
  the same distribution (the corpus's), which is what the thresholds assume, at any size up to 2,000;
- ``disjoint``: no document is in two runs: a random permutation of the corpus is cut into the 7 runs,
  their drawn sizes scaled down together (at least 5 each) until they fit in it.

Each design runs on two populations: the corpus as it is (no blank text, no mostly non-letters
document), and the corpus with 4 blank texts and 4 mostly-punctuation page headers added (1% each), so
that the rejected and mostly non-letters shares are tested where a run of a handful of documents can
hold one of them. The share signals are also judged by the rule they replace (``old 4-sigma share
rule``) for comparison. Last, the two cases of issue 21 with real documents: 5 ordinary documents, one
of them a page header, and 9 documents plus a blank text, each against 6 earlier runs drawn as above.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docembed.quality import drift  # noqa: E402
from docembed.quality import stats as quality  # noqa: E402
from docembed.transforms.inference import embed_rows  # noqa: E402
from docembed.model.embedder import Embedder  # noqa: E402
from docembed.model.ref import ModelRef, packaged_default  # noqa: E402
from docembed.records import EmbedSettings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "jobs" / "sample" / "docs.parquet"
EARLIER_RUNS = 6
SMALLEST, LARGEST = 5, 2000
BANDS = ((5, 20), (20, 100), (100, 500), (500, 2001))
SIGNALS = ("lengths", "mean cosine", "truncated", "rejected", "mostly non-letters")
# Page headers and rules as exports carry them: mostly punctuation and digits.
HEADERS = ["=" * 30 + " Page 12 " + "=" * 30, "- - - - - - - - - - - - - - - - 3 - - - - - - - - - - - - - - - -",
           "*** *** *** *** *** *** *** *** ***", "|----|------|--------|------|\n| 01 | 2024 | 15:30 | 7.5% |"]
BLANKS = ["", "   ", "\n\n", "\t \n"]


def machine() -> str:
    """The CPU, its cores, the vector-instruction flags that change fp32 numerics, and the libraries."""
    import torch

    with open("/proc/cpuinfo") as handle:
        info = handle.read()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{model}, {os.cpu_count()} cores, flags {' '.join(shown) or 'none of avx2/avx512'}; "
            f"{platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}")


def embed_corpus(texts: list[str], threads: int) -> dict[str, np.ndarray]:
    """Per document, as a worker sees it: ``rejected`` (the reader's empty-text rule), and for the
    others ``tokens`` (whole text), ``truncated`` (longer than the window), ``nonletter``, ``norm``
    (before normalisation) and ``vector`` (what the output gets). fp32 on the CPU, the default model."""
    array = pa.array(texts, pa.string())
    rejected = np.asarray(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(array), ""), True), dtype=bool)
    kept = [t for t, r in zip(texts, rejected) if not r]
    embedder = Embedder(packaged_default(), "cpu", "fp32", None, threads=threads)
    settings = EmbedSettings(
        output="", model_ref=ModelRef("", "package", ""), dim=embedder.dim, max_seq_length=embedder.max_seq_length,
        pooling="", normalize=embedder.normalize, precision="fp32", device="cpu", prefix="", id_column="id",
        text_column="text", passthrough_columns=(), min_batch_size=64, max_batch_size=256,
        max_batch_tokens=64 * embedder.max_seq_length, run_id="drift-false-positives")
    done = embed_rows(embedder, kept, settings)
    assert not done.failed, done.failed
    n, where = len(texts), np.flatnonzero(~rejected)
    out = {"rejected": rejected, "tokens": np.zeros(n, np.int64), "truncated": np.zeros(n, bool),
           "nonletter": np.zeros(n, bool), "norm": np.zeros(n, np.float32),
           "vector": np.zeros((n, embedder.dim), np.float32)}
    out["tokens"][where] = done.doc_tokens
    out["truncated"][where] = done.doc_tokens > embedder.window_size
    out["nonletter"][where] = quality.mostly_non_letters(pa.array(kept, pa.string()))
    out["norm"][where], out["vector"][where] = done.norms, done.vectors
    return out


def marker(docs: dict[str, np.ndarray], rows: np.ndarray) -> dict:
    """The done-marker fields drift reads, for one unit holding the documents ``rows`` (repeats allowed)."""
    rejected = docs["rejected"][rows]
    kept = rows[~rejected]
    stats = quality.unit_stats(docs["tokens"][kept], docs["nonletter"][kept], docs["norm"][kept], docs["vector"][kept])
    return {"quality": stats, "truncated": int(docs["truncated"][kept].sum()),
            "rejected_by_reason": {"empty_text": int(rejected.sum())} if rejected.any() else {}}


def record(docs: dict[str, np.ndarray], rows: np.ndarray) -> dict:
    """A run's statistics as the launcher makes them: its units' markers through ``drift.run_quality``
    (a run of at most 2,000 rows is one unit at the default --checkpoint-every)."""
    return drift.run_quality([marker(docs, rows)])


def participation_ratio(vectors: np.ndarray) -> float:
    """How many directions the vectors vary in: (sum of the covariance's eigenvalues)^2 over the sum of
    their squares. The mean-vector gap's tail is chi-square-like with about this many degrees of
    freedom, so its factor of 4 over the mean gap is safe when it is large."""
    eigenvalues = np.linalg.eigvalsh(np.cov(vectors.astype(np.float64), rowvar=False))
    return float(eigenvalues.sum() ** 2 / (eigenvalues ** 2).sum())


def log_uniform(rng: np.random.Generator, count: int) -> np.ndarray:
    return np.exp(rng.uniform(math.log(SMALLEST), math.log(LARGEST + 1), count)).astype(int).clip(SMALLEST, LARGEST)


def draw_iid(rng: np.random.Generator, population: int) -> list[np.ndarray]:
    """7 runs (now first) drawn with replacement: each a sample of the population's distribution."""
    return [rng.integers(0, population, size) for size in log_uniform(rng, EARLIER_RUNS + 1)]


def draw_disjoint(rng: np.random.Generator, population: int) -> list[np.ndarray]:
    """7 runs (now first) that share no document: drawn sizes scaled down together to fit the population."""
    sizes = log_uniform(rng, EARLIER_RUNS + 1).astype(float)
    sizes = np.maximum(SMALLEST, np.floor(sizes * min(1.0, population / sizes.sum()))).astype(int)
    while sizes.sum() > population:  # the floor of 5 can overshoot: trim the largest
        sizes[np.argmax(sizes)] -= 1
    order = rng.permutation(population)
    return np.split(order[:sizes.sum()], np.cumsum(sizes)[:-1])


def old_share_rule(now: dict, base: dict) -> set[str]:
    """The share signals the replaced rule flagged: a move beyond max(5 points, 4 standard errors of
    the difference of two proportions, pooled)."""
    flagged = set()
    for name, (count, total) in drift.shares(now).items():
        base_count, base_total = drift.shares(base)[name]
        if total and base_total:
            p, p0, pooled = count / total, base_count / base_total, (count + base_count) / (total + base_total)
            limit = max(0.05, 4 * math.sqrt(pooled * (1 - pooled) * (1 / total + 1 / base_total)))
            if abs(p - p0) > limit:
                flagged.add(name)
    return flagged


def trials(docs: dict, draw, count: int, seed: int) -> list[dict]:
    """``count`` trials: per trial the run sizes, the signals flagged, and those the old share rule flags."""
    rng = np.random.default_rng(seed)
    population = len(docs["rejected"])
    found = []
    for _ in range(count):
        runs = draw(rng, population)
        now, earlier = record(docs, runs[0]), [record(docs, r) for r in runs[1:]]
        result = drift.compare(now, earlier, [f"r{k}" for k in range(len(earlier))])
        flagged = {s["name"] for s in result["signals"] if s["flagged"]}
        old = {s for s in flagged if s in ("lengths", "mean cosine")} | old_share_rule(now, drift.pooled(earlier))
        found.append({"now": len(runs[0]), "earlier": [len(r) for r in runs[1:]], "flagged": flagged, "old": old,
                      "signals": result["signals"], **margins(now, drift.pooled(earlier), result["signals"])})
    return found


def margins(now: dict, base: dict, signals: list[dict]) -> dict:
    """How close the two noise terms came to their limits: 1 - cosine over the gap sampling predicts
    (``quality.sampling_gap``; flagged past 4x, or the 0.1 floor), and KS D over KS's critical value
    (flagged past 1, or the 0.2 floor). Nones where the run now had no embedded document."""
    by_name = {s["name"]: s for s in signals}
    if "mean cosine" not in by_name:
        return {"gap": None, "ks": None}
    n, m = now["docs"], base["docs"]
    return {"gap": (1 - by_name["mean cosine"]["value"]) / quality.sampling_gap(now, base),
            "ks": by_name["lengths"]["value"] / (drift.KS_COEFFICIENT * math.sqrt((n + m) / (n * m)))}


def rate(hits: int, total: int) -> str:
    """A share with its 95% upper bound (Clopper-Pearson's for no hit: 3/n), so 0 of n reads right."""
    if not total:
        return "-"
    upper = 1 - 0.05 ** (1 / total) if not hits else None
    return f"{hits}/{total} = {100 * hits / total:.2f}%" + (f" (95% upper bound {100 * upper:.2g}%)" if upper else "")


def summarise(found: list[dict], log, examples: bool = True) -> None:
    """Flagged trials overall, per signal and by the size of the run now; the noise terms' margins;
    with ``examples``, each flagged trial's drift line."""
    flagged = sum(1 for f in found if f["flagged"])
    log(f"  flagged (any signal):        {rate(flagged, len(found))}")
    log(f"  old 4-sigma share rule:      {rate(sum(1 for f in found if f['old']), len(found))}")
    for name in SIGNALS:
        new, old = sum(name in f["flagged"] for f in found), sum(name in f["old"] for f in found)
        shares = name not in ("lengths", "mean cosine")  # the old rule differs on the shares only
        log(f"    {name:<20} {new:>5} flagged" + (f" (old rule {old})" if shares else ""))
    for low, high in BANDS:
        band = [f for f in found if low <= f["now"] < high]
        hits = sum(1 for f in band if f["flagged"])
        log(f"  now {low:>4}-{min(high - 1, LARGEST):<4} documents: {rate(hits, len(band))}"
            f"; old rule {rate(sum(1 for f in band if f['old']), len(band))}")
        gaps, ks = [f["gap"] for f in band if f["gap"] is not None], [f["ks"] for f in band if f["ks"] is not None]
        if gaps:
            log(f"      1 - cosine / predicted gap: p50 {np.median(gaps):.2f}, p99 {np.quantile(gaps, 0.99):.2f}, "
                f"max {max(gaps):.2f} (limit 4); KS D / critical value: p99 {np.quantile(ks, 0.99):.2f}, "
                f"max {max(ks):.2f} (limit 1)")
    for f in found if examples else ():
        if f["flagged"]:
            lines = [drift.describe_signal(s) for s in f["signals"] if s["flagged"]]
            log(f"    flagged: now {f['now']} against {f['earlier']}: {'; '.join(lines)}")


def scenario(docs: dict, odd: int, ordinary: int, count: int, seed: int, log, label: str) -> None:
    """Issue 21's cases: ``ordinary`` random corpus documents plus the document ``odd``, against 6
    earlier runs drawn as in ``iid`` from the corpus's ordinary documents (so a base of 0 for the odd
    kind, the hardest case); how often it is flagged, by the exact test and by the old rule."""
    rng = np.random.default_rng(seed)
    plain = np.flatnonzero(~docs["rejected"] & ~docs["nonletter"])
    new = old = 0
    example = None
    for _ in range(count):
        now = record(docs, np.append(rng.choice(plain, ordinary), odd))
        earlier = [record(docs, plain[r]) for r in draw_iid(rng, len(plain))[1:]]
        result = drift.compare(now, earlier, [f"r{k}" for k in range(len(earlier))])
        new += result["flagged"]
        old += bool(old_share_rule(now, drift.pooled(earlier)))
        example = example or drift.format_line(result)
    log(f"  {label}: flagged {rate(new, count)}; old rule {rate(old, count)}")
    log(f"    e.g. {example}")


def smallest_flagged(n: int, base_count: int, base_total: int) -> str:
    """The fewest of ``n`` documents that flag a share against ``base_count`` of ``base_total``."""
    for count in range(n + 1):
        if count * base_total > base_count * n and drift.share_signal("x", count, n, base_count, base_total)["flagged"]:
            return f"{count} ({100 * count / n:.1f}%)"
    return "never"


def sensitivity(log) -> None:
    """What the share test needs to flag a rise, by the run's size and the baseline's share."""
    bases = ((0, 10_000), (0, 1_000_000), (100, 10_000), (1_000, 10_000))
    log("  documents now | " + " | ".join(f"{c} of {t:,} before" for c, t in bases))
    for n in (5, 10, 20, 50, 100, 1_000, 10_000, 100_000):
        log(f"  {n:>13,} | " + " | ".join(f"{smallest_flagged(n, c, t):>{len(f'{c} of {t:,} before')}}"
                                            for c, t in bases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2000, help="trials per design and population")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=None, help="also write the output here")
    args = parser.parse_args()
    lines: list[str] = []

    def log(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    log(f"# {machine()}")
    log(f"$ python {' '.join(shlex.quote(a) for a in sys.argv)}")
    texts = pq.read_table(SAMPLE).column("text").to_pylist()
    started = time.perf_counter()
    docs = embed_corpus(texts + BLANKS + HEADERS, args.threads)
    corpus = {k: v[:len(texts)] for k, v in docs.items()}
    log(f"corpus: {len(texts)} documents ({int(corpus['truncated'].sum())} truncated, "
        f"{int(corpus['nonletter'].sum())} mostly non-letters, {int(corpus['rejected'].sum())} rejected), "
        f"embedded in {time.perf_counter() - started:.1f} s; with odd documents: {len(docs['rejected'])} "
        f"(+{len(BLANKS)} blank, +{int(docs['nonletter'].sum()) - int(corpus['nonletter'].sum())} mostly non-letters)")
    mean = corpus["vector"].mean(axis=0, dtype=np.float64)
    log(f"corpus vectors: mean vector length {np.linalg.norm(mean):.3f}, participation ratio of their covariance "
        f"{participation_ratio(corpus['vector']):.0f} (of {corpus['vector'].shape[1]} dimensions)")
    log(f"thresholds: KS floor {drift.KS_FLOOR}, coefficient {drift.KS_COEFFICIENT}; mean cosine floor "
        f"{drift.COSINE_FLOOR}, noise x{drift.COSINE_NOISE}; shares floor {drift.SHARE_FLOOR}, "
        f"alpha {drift.SHARE_ALPHA:g}")
    log(f"each trial: 1 run now against {EARLIER_RUNS} earlier runs, sizes log-uniform {SMALLEST}-{LARGEST}")
    everything = []
    for k, (design, draw) in enumerate((("iid", draw_iid), ("disjoint", draw_disjoint))):
        for j, (name, population) in enumerate((("corpus", corpus), ("corpus + odd documents", docs))):
            started = time.perf_counter()
            found = trials(population, draw, args.trials, args.seed + 10 * k + j)
            everything += found
            log(f"\n## {design}, {name}: {len(found)} trials ({time.perf_counter() - started:.0f} s)")
            summarise(found, log)
    log(f"\n## all {len(everything)} trials")
    summarise(everything, log, examples=False)
    log("\n## issue 21's cases, real documents, against 6 earlier runs of the corpus (iid)")
    header = len(texts) + len(BLANKS)  # the first page header
    scenario(docs, header, 4, args.trials, args.seed + 100, log, "5 documents, one a page header")
    scenario(docs, len(texts), 9, args.trials, args.seed + 101, log, "9 documents + 1 blank text")
    log("\n## the fewest documents that flag a rise of a share (rejected, truncated, mostly non-letters)")
    sensitivity(log)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
