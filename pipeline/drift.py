"""Drift: a run's quality statistics, and how they compare with the earlier runs into the same output.

``run_quality`` merges the statistics the done-markers of one run carry (``transforms.quality``) with
their counts (truncated, rejected by reason). ``compare`` sets them against the pooled statistics of
up to ``BASELINE_RUNS`` earlier runs (their reports' ``quality``), on four signals, each flagged past
a threshold that grows with the sampling noise two runs of these sizes would show by chance, and
never below a floor (so that huge runs are not flagged for trivial shifts):

- ``lengths``: the two-sample Kolmogorov-Smirnov statistic D between the runs' distributions of
  document length in tokens (the largest gap between their cumulative shares); flagged when
  D > max(0.2, 2.15 * sqrt((n + m) / (n * m))), the second term being KS's critical value at p = 2e-4;
- ``mean cosine``: the cosine between the runs' mean vectors; flagged when 1 - cosine > max(0.1,
  4 x the gap sampling alone gives, ``quality.sampling_gap``);
- ``truncated``, ``rejected``, ``mostly non-letters``: the share of documents; flagged when it moved
  by more than max(0.05, 4 standard errors of the difference of two proportions).

All pure: the callers read the markers and reports.
"""

from __future__ import annotations

import collections
import math

from transforms import quality

BASELINE_RUNS = 7  # a nightly job is compared with its last week

KS_FLOOR, KS_COEFFICIENT = 0.2, 2.15  # KS's critical value at p = 2 exp(-2 x 2.15^2) = 1.9e-4
COSINE_FLOOR, COSINE_NOISE = 0.1, 4.0
SHARE_FLOOR, SHARE_SIGMAS = 0.05, 4.0


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
        signals.append(_share(name, count, total, *shares(base)[name]))
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


def _share(name: str, count: int, total: int, base_count: int, base_total: int) -> dict | None:
    if not total or not base_total:
        return None
    p, p0 = count / total, base_count / base_total
    pooled_p = (count + base_count) / (total + base_total)
    limit = max(SHARE_FLOOR, SHARE_SIGMAS * math.sqrt(pooled_p * (1 - pooled_p) * (1 / total + 1 / base_total)))
    return {"name": name, "value": p - p0, "limit": limit, "flagged": abs(p - p0) > limit, "now": p, "before": p0}


def describe(signal: dict) -> str:
    """One signal as the drift line shows it, with its limit."""
    name, value, limit = signal["name"], signal["value"], signal["limit"]
    if name == "lengths":
        return (f"lengths KS {value:.2f} {'>' if signal['flagged'] else '<='} {limit:.2f} "
                f"(median {signal['before']:.0f} -> {signal['now']:.0f} tokens)")
    if name == "mean cosine":
        return f"mean-vector cosine {value:.3f} {'<' if signal['flagged'] else '>='} {limit:.3f}"
    return (f"{name} {100 * signal['before']:.1f}% -> {100 * signal['now']:.1f}% "
            f"({'beyond' if signal['flagged'] else 'within'} ±{100 * limit:.1f} pts)")


def format_line(drift: dict | None) -> str:
    """The summary's ``drift`` line."""
    if not drift or not drift.get("docs"):
        return "first run into this output with documents: later runs are compared with it"
    if not drift.get("signals"):
        return "nothing to compare: this run neither embedded nor rejected a document"
    runs = len(drift["runs"])
    against = f"against {runs} earlier run{'s' if runs != 1 else ''} ({drift['docs']} documents)"
    flagged = [describe(s) for s in drift["signals"] if s["flagged"]]
    calm = [describe(s) for s in drift["signals"] if not s["flagged"]]
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
        ("input", f"{q['docs']} documents, tokens {tokens}; truncated {_percent(*share['truncated'])}, {rejects}, "
                  f"mostly non-letters {_percent(*share['mostly non-letters'])}"),
        ("vectors", f"norm before normalisation {norms}"
                    + (f"; mean vector length {math.sqrt(float(mean @ mean)):.3f}" if mean is not None else "")),
    ]


def fraction(count: int, total: int) -> float:
    """``count`` out of ``total`` (a ``shares`` pair), 0 when there is nothing to count."""
    return count / total if total else 0.0


def _percent(count: int, total: int) -> str:
    return f"{100 * fraction(count, total):.1f}%"
