"""Drift: a run's quality statistics, and how they compare with the earlier runs into the same output.

``run_quality`` merges the statistics the done-markers of one run carry (``docembed.quality.stats``) with
their counts (truncated, rejected by reason). ``compare`` sets them against the pooled statistics of
up to ``BASELINE_RUNS`` earlier runs (their reports' ``quality``), on five signals, each flagged only
past what two runs of these sizes (n documents now, m before) would show by chance, and never for a
shift below a floor (so that huge runs are not flagged for trivial shifts):

- ``lengths``: the two-sample Kolmogorov-Smirnov statistic D between the runs' distributions of
  document length in tokens (the largest gap between their cumulative shares); flagged when
  D > max(0.2, 2.15 * sqrt((n + m) / (n * m))), the second term being KS's critical value at p = 2e-4;
- ``mean cosine``: the cosine between the runs' mean vectors; flagged when 1 - cosine > max(0.1,
  4 x the gap sampling alone gives, ``quality.sampling_gap``);
- ``truncated``, ``rejected``, ``mostly non-letters``: the share of documents; flagged when Fisher's
  exact test, one-sided in the direction the share moved, gives p < ``SHARE_ALPHA`` (1e-4) and the
  share moved by more than ``SHARE_FLOOR`` (5 points), both judged with the run's count moved back by
  one document: one odd or blank document never decides, whatever the sizes.

All pure: the callers read the markers and reports.
"""

from __future__ import annotations

import collections
import math

from docembed.quality import stats as quality
from docembed.text import plural

BASELINE_RUNS = 7  # a nightly job is compared with its last week

KS_FLOOR, KS_COEFFICIENT = 0.2, 2.15  # KS's critical value at p = 2 exp(-2 x 2.15^2) = 1.9e-4
# Measured on the bundled corpus at every run size from 5 to 2,000 (bench/drift_false_positives.py),
# 1 - cosine stayed within 2.2x the gap predicted; a run so small that 4x its predicted gap is past 2
# cannot be flagged on it at all (fewer than 7 documents there).
COSINE_FLOOR, COSINE_NOISE = 0.1, 4.0
SHARE_FLOOR = 0.05  # a share that moved by 5 points or less is never flagged, however many documents
# Fisher's exact test at this level, one-sided: the exact tail of both runs' counts, right at any size
# (the normal approximation it replaces called one odd document in five "4 sigma" against a base of 0).
SHARE_ALPHA = 1e-4
TAIL_PRECISION = 1e-12  # a tail sum stops when what is left of it is below this share of it


def run_quality(markers) -> dict:
    """One run's statistics from its units' markers: their ``quality`` records with the counts of
    documents truncated and rejected (by reason), ``pooled``."""
    return pooled([{**(m.get("quality") or {}), "truncated": m.get("truncated", 0),
                    "rejected_by_reason": m.get("rejected_by_reason", {})} for m in markers])


RECORD_FIELDS = {"docs": int, "tokens": dict, "nonletter": int, "norms": dict, "vectors": int, "square": float}


def well_formed(q) -> bool:
    """Whether ``q`` is a run's statistics as ``run_quality`` makes them (a report of another version,
    or edited by hand, may hold something else: it is then left out of comparisons)."""
    return (isinstance(q, dict) and isinstance(q.get("mean"), (str, type(None)))
            and all(isinstance(q.get(k), (t, int) if t is float else t) for k, t in RECORD_FIELDS.items()))


def pooled(runs: list[dict]) -> dict:
    """Several units' or runs' statistics as one: ``quality.merge`` of those that have them, with the
    truncated and rejected (by reason) counts added up."""
    reasons = collections.Counter()
    for run in runs:
        reasons.update(run.get("rejected_by_reason", {}))
    return {**quality.merge(runs), "truncated": sum(r.get("truncated", 0) for r in runs),
            "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items()))}


def shares(q: dict) -> dict[str, tuple[int, int]]:
    """(count, out of) per share signal: truncated and mostly non-letters among embedded documents,
    rejected among all the run's rows."""
    return {"truncated": (q.get("truncated", 0), q["docs"]),
            "rejected": (q.get("rejected", 0), q["docs"] + q.get("rejected", 0)),
            "mostly non-letters": (q.get("nonletter", 0), q["docs"])}


def compare(now: dict, earlier: list[dict], runs: list[str] | None = None) -> dict:
    """``now`` (``run_quality``) against ``earlier`` runs' (oldest first): the signals, and whether any
    is flagged. No earlier runs, or none with documents: nothing to compare, nothing flagged."""
    earlier = [e for e in earlier if e and e.get("docs")]
    if not earlier:
        return {"runs": [], "docs": 0, "signals": [], "flagged": False}
    base = pooled(earlier)
    # A run whose every row was rejected has no lengths or vectors, but its rejected share speaks.
    signals = [_lengths(now, base), _mean(now, base)] if now.get("docs") else []
    for name, (count, total) in shares(now).items():
        signals.append(share_signal(name, count, total, *shares(base)[name]))
    signals = [s for s in signals if s is not None]
    return {"runs": list(runs or []), "docs": base["docs"], "signals": signals,
            "flagged": any(s["flagged"] for s in signals)}


def _lengths(now: dict, base: dict) -> dict:
    n, m = now["docs"], base["docs"]
    limit = max(KS_FLOOR, KS_COEFFICIENT * math.sqrt((n + m) / (n * m)))
    value = quality.cdf_distance(now["tokens"], base["tokens"])
    return {"name": "lengths", "value": value, "limit": limit, "flagged": value > limit,
            "now": quality.percentile(now["tokens"], 50), "before": quality.percentile(base["tokens"], 50)}


def _mean(now: dict, base: dict) -> dict | None:
    cosine = quality.mean_cosine(now, base)
    if cosine is None:
        return None
    limit = 1 - max(COSINE_FLOOR, COSINE_NOISE * quality.sampling_gap(now, base))
    return {"name": "mean cosine", "value": cosine, "limit": limit, "flagged": cosine < limit}


def share_signal(name: str, count: int, total: int, base_count: int, base_total: int) -> dict | None:
    """One share signal: ``count`` of ``total`` now against ``base_count`` of ``base_total`` before,
    with Fisher's one-sided p-value (``p``) and the level it is held to (``alpha``)."""
    if not total or not base_total:
        return None
    now, before = count / total, base_count / base_total
    p, flagged = 1.0, False
    if count * base_total != base_count * total:
        up = count * base_total > base_count * total
        # Judged with one of the documents that moved the share counted the other way: one odd
        # document in a handful, or one blank text against millions without any, is not a drift.
        moved_back = count - 1 if up else count + 1
        p = share_p(moved_back, total, base_count, base_total, up)
        shift = moved_back / total - before
        flagged = p < SHARE_ALPHA and (shift if up else -shift) > SHARE_FLOOR
    return {"name": name, "value": now - before, "limit": SHARE_FLOOR, "flagged": flagged, "now": now,
            "before": before, "p": p, "alpha": SHARE_ALPHA}


def share_p(count: int, total: int, base_count: int, base_total: int, up: bool) -> float:
    """Fisher's exact test, one-sided: the chance that ``total`` documents drawn without replacement
    from both runs' documents hold ``count`` or more (``up``), or ``count`` or fewer, of the two runs'
    ``count + base_count`` counted ones. Exact at any sizes; both sizes count."""
    return hypergeometric_tail(count, total, count + base_count, total + base_total, up)


def hypergeometric_tail(x: int, draws: int, marked: int, population: int, upper: bool) -> float:
    """P(X >= x) (``upper``) or P(X <= x), X the marked items among ``draws`` taken without replacement
    from ``population`` items of which ``marked`` are marked. The tail is summed from the end nearer
    the distribution's mode outwards, term by term (each from the one before), in log space, and
    stops once the rest is provably negligible: a few thousand steps at most for millions of items."""
    low, high = max(0, draws - (population - marked)), min(draws, marked)
    if (x <= low) if upper else (x >= high):
        return 1.0
    if (x > high) if upper else (x < low):
        return 0.0
    mode = (draws + 1) * (marked + 1) // (population + 2)
    if upper:
        return _tail_from(x, +1, draws, marked, population) if x > mode else \
            max(0.0, 1.0 - _tail_from(x - 1, -1, draws, marked, population))
    return _tail_from(x, -1, draws, marked, population) if x < mode else \
        max(0.0, 1.0 - _tail_from(x + 1, +1, draws, marked, population))


def _tail_from(x: int, step: int, draws: int, marked: int, population: int) -> float:
    """The hypergeometric probabilities summed from ``x`` away from the mode (``step`` +1 or -1), where
    they only fall: the pmf is log-concave, so once a term's ratio to the one before is r < 1, all that
    is left is below term * r / (1 - r)."""
    log_first = (_log_choose(marked, x) + _log_choose(population - marked, draws - x)
                 - _log_choose(population, draws))
    term, total = 1.0, 1.0  # relative to the first term, which may be far below the smallest float
    while True:
        ratio = _next_ratio(x, step, draws, marked, population)
        term *= ratio
        total += term
        x += step
        if ratio == 0.0 or (ratio < 1 and term * ratio / (1 - ratio) < TAIL_PRECISION * total):
            return min(1.0, math.exp(log_first + math.log(total)))


def _next_ratio(x: int, step: int, draws: int, marked: int, population: int) -> float:
    """P(X = x + step) / P(X = x) for the hypergeometric X above; 0 past the end of its support."""
    others = population - marked
    if step > 0:
        if x >= min(draws, marked):
            return 0.0
        return (marked - x) * (draws - x) / ((x + 1) * (others - draws + x + 1))
    if x <= max(0, draws - others):
        return 0.0
    return x * (others - draws + x) / ((marked - x + 1) * (draws - x + 1))


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def describe_signal(signal: dict) -> str:
    """One signal as the drift line shows it, with the limit that applied."""
    name, value, limit = signal["name"], signal["value"], signal["limit"]
    if name == "lengths":
        return (f"lengths KS {value:.2f} {'>' if signal['flagged'] else '<='} {limit:.2f} "
                f"(median {signal['before']:.0f} -> {signal['now']:.0f} tokens)")
    if name == "mean cosine":
        return f"mean-vector cosine {value:.3f} {'<' if signal['flagged'] else '>='} {limit:.3f}"
    shares = f"{name} {100 * signal['before']:.1f}% -> {100 * signal['now']:.1f}%"
    if "p" not in signal:  # a report of an earlier version: a limit in points, no p-value
        return f"{shares} ({'beyond' if signal['flagged'] else 'within'} ±{100 * limit:.1f} pts)"
    p, alpha = signal["p"], signal.get("alpha", SHARE_ALPHA)
    # Past 1e-99 the exact figure says nothing more (and below 1e-308 a float holds 0).
    shown = "p < 1e-99" if p < 1e-99 else f"p {p:.2g} {'<' if p < alpha else '>='} {alpha:g}"
    if p < alpha and not signal["flagged"]:  # certain, but a move within the floor
        shown += f", within ±{100 * limit:.1f} pts"
    return f"{shares} ({shown})"


def format_line(drift: dict | None) -> str:
    """The summary's ``drift`` line."""
    if not drift or not drift.get("docs"):
        return "first run into this output with documents: later runs are compared with it"
    if not drift.get("signals"):
        return "nothing to compare: this run neither embedded nor rejected a document"
    runs = len(drift["runs"])
    against = f"against {plural(runs, 'earlier run')} ({plural(drift['docs'], 'document')})"
    flagged = [describe_signal(s) for s in drift["signals"] if s["flagged"]]
    calm = [describe_signal(s) for s in drift["signals"] if not s["flagged"]]
    if not flagged:
        return f"none {against}: {'; '.join(calm)}"
    return f"FLAGGED {against}: {'; '.join(flagged)}" + (f". Within limits: {'; '.join(calm)}" if calm else "")


def format_quality(q: dict) -> list[tuple[str, str]]:
    """(label, line) pairs for a run's input and vector statistics."""
    if not q.get("docs") and not q.get("rejected"):
        return []
    share = shares(q)
    reasons = ", ".join(f"{n} {r}" for r, n in q.get("rejected_by_reason", {}).items())
    rejects = f"rejected {_percent(*share['rejected'])}{f' ({reasons})' if reasons else ''}"
    if not q["docs"]:
        return [("input", f"no document embedded; {rejects}")]
    tokens = ", ".join(f"{label} {quality.percentile(q['tokens'], p):.0f}"
                       for label, p in (("p10", 10), ("p50", 50), ("p90", 90), ("p99", 99), ("max", 100)))
    norms = ", ".join(f"{label} {quality.percentile(q['norms'], p):.2f}" for label, p in
                      (("p1", 1), ("p50", 50), ("p99", 99)))
    mean = quality.mean_vector(q)
    return [
        ("input", f"{plural(q['docs'], 'document')}, tokens {tokens}; truncated {_percent(*share['truncated'])}, "
                  f"{rejects}, mostly non-letters {_percent(*share['mostly non-letters'])}"),
        ("vectors", f"norm before normalisation {norms}"
                    + (f"; mean vector length {math.sqrt(float(mean @ mean)):.3f}" if mean is not None else "")),
    ]


def fraction(count: int, total: int) -> float:
    """``count`` out of ``total`` (a ``shares`` pair), 0 when there is nothing to count."""
    return count / total if total else 0.0


def _percent(count: int, total: int) -> str:
    return f"{100 * fraction(count, total):.1f}%"
