"""Status: units and documents done out of the plan, read from the checkpoints of an output folder.

Works while a run is going (from done-markers and running units' progress records) and after it.
Whether a run is going is the lock's to say (``lock.lock_state``): "running" only while a live lock
holds the output (its heartbeat younger than its TTL, its process alive where it ran on this host);
otherwise the manifest says how the last run ended: complete, failed (with its error) or interrupted
(a stop signal, or a run killed with its manifest still saying "running"). An ETA only while one runs.
Also gives the latest run's quality statistics (from its units' markers, so far) and their drift
against the runs before it (``docembed.quality.drift``).
"""

from __future__ import annotations

from docembed.quality import drift

from docembed.pipeline.admin import repair, report
from docembed.pipeline.lock import lock_state, utc
from docembed.store.admin import OutputAdmin, marker_totals
from docembed.pipeline.plan import describe_outside, outside_plan
from docembed.errors import OutputError


def status(output_url: str) -> dict:
    output = OutputAdmin(output_url)
    manifest = output.read_manifest()
    if manifest is None:
        raise OutputError(f"{output_url} has no _manifest.json: no docembed run has started there")
    markers, damage = repair.find(output)
    outside = outside_plan(markers, {i["url"] for i in manifest.get("inputs", [])})
    markers = {uid: m for uid, m in markers.items() if uid not in {u for g in outside for u in g["unit_ids"]}}
    plan = manifest.get("plan", {})
    run = run_state(manifest, lock_state(output), markers, plan.get("units"))
    # Progress records of units that no live run holds are what a stopped run left, not work going on.
    running = {uid: p for uid, p in output.progress().items() if uid not in markers} if run["live"] else {}
    run_id = manifest.get("run_id")
    latest = drift.run_quality(m for m in markers.values() if m.get("run_id") == run_id)
    earlier = report.history(output, before=run_id) if run_id else []
    return {
        "run_id": run_id,
        "quality": latest,
        "drift": report.with_drift({"quality": latest}, earlier)["drift"],
        **eta(markers, running, plan.get("text_bytes") or 0, run["live"]),
        "output": output_url,
        "state": run["state"],
        "run": run,
        "units_done": len(markers),
        "units_total": plan.get("units"),
        "docs_done": sum(m["row_end"] - m["row_start"] for m in markers.values()),
        "docs_in_progress": sum(p["docs"] for p in running.values()),
        "docs_total": plan.get("rows"),
        **{k: v for k, v in marker_totals(markers.values()).items() if k in ("embedded", "rejected")},
        "units_running": len(running),
        "damaged": [d.describe() for d in damage],
        "outside_inputs": [describe_outside(g) + (" stay; `docembed run --prune-removed` deletes them" if g["gone"]
                                                  else " stay") for g in outside],
    }


def run_state(manifest: dict, lock: dict | None, markers: dict, units_total: int | None) -> dict:
    """How the output's last run stands: ``state`` (running, complete, failed or interrupted), ``live``
    (a live lock holds the output), ``at`` (when it ended, or its last sign of life), ``error``, and
    ``line``, what ``status`` prints. A manifest still saying "running" with no live lock was left by
    a killed run: interrupted at its lock's last heartbeat, else at its last commit or its start."""
    if lock and lock["live"]:
        return {"state": "running", "live": True, "at": lock["heartbeat"], "error": None,
                "line": f"running: {lock['holder']}"}
    status = manifest.get("status")
    done = f"{len(markers)}/{units_total if units_total is not None else '?'} units committed"
    if status == "complete":
        at = manifest.get("finished_at")
        return {"state": "complete", "live": False, "at": at, "error": None,
                "line": f"complete{f' at {utc(at)}' if at else ''}, {done}"}
    if status in ("failed", "interrupted"):
        at, error = manifest.get("ended_at"), manifest.get("error")
    else:  # killed: no run recorded its end
        at, error = last_sign_of_life(manifest, lock, markers), None
        status = "interrupted"
    said = f"{status} at {utc(at) if at else 'an unknown time'} with {done}"
    advice = "" if "rerun" in (error or "") else "; rerun the same command to resume"  # a job's error says it
    return {"state": status, "live": False, "at": at, "error": error,
            "line": said + (f": {error}" if error else "") + advice}


def last_sign_of_life(manifest: dict, lock: dict | None, markers: dict) -> float | None:
    """When a run that recorded no end was last seen: the latest of its start, its commits and its
    lock's last heartbeat (a beat comes every TTL / 4, so a commit may be later)."""
    seen = [m["committed_at"] for m in markers.values() if m.get("run_id") == manifest.get("run_id")]
    seen += [t for t in (manifest.get("started_at"), (lock or {}).get("heartbeat")) if t]
    return max(seen, default=None)


RATE_WINDOW = 10  # units: the rate is measured over the most recently committed ones


def eta(markers: dict, running: dict, total_bytes: int, active: bool) -> dict:
    """Seconds left, from text bytes remaining (a characters count) and the rate of the last units
    committed, so a skewed corpus (short documents first, long ones last) does not mislead."""
    done_bytes = sum(m.get("text_bytes", 0) for m in markers.values())
    done_bytes += sum(int(p.get("text_bytes", 0) * p["docs"] / p["total"]) for p in running.values()
                      if p.get("total"))
    recent = sorted(markers.values(), key=lambda m: m["committed_at"])[-RATE_WINDOW:]
    rate = None
    if len(recent) >= 2:
        span = recent[-1]["committed_at"] - min(m.get("started_at") or recent[0]["committed_at"] for m in recent)
        rate = sum(m.get("text_bytes", 0) for m in recent) / span if span > 0 else None
    left = max(0, total_bytes - done_bytes)
    seconds = left / rate if (active and rate) else None
    return {"text_bytes_done": done_bytes, "text_bytes_total": total_bytes, "eta_s": seconds}


def format_status(s: dict) -> str:
    share = 100.0 * s["docs_done"] / s["docs_total"] if s["docs_total"] else 100.0
    return "\n".join([
        f"output     {s['output']}",
        f"run        {s['run']['line']}",
        f"units      {s['units_done']}/{s['units_total']} done, {s['units_running']} running",
        f"documents  {s['docs_done']}/{s['docs_total']} done ({share:.1f}%), "
        f"{s['docs_in_progress']} more in running units",
        f"           {s['embedded']} embedded, {s['rejected']} rejected",
        f"text       {s['text_bytes_done'] / 1e6:.1f}/{s['text_bytes_total'] / 1e6:.1f} MB"
        + (f", about {s['eta_s'] / 60:.1f} min left at the recent rate" if s.get("eta_s") is not None else ""),
        *(f"{label:<10} {line} (run {s['run_id']})" for label, line in drift.format_quality(s.get("quality") or {})),
        *([f"drift      {drift.format_line(s['drift'])}"] if (s.get("quality") or {}).get("docs")
          or (s.get("quality") or {}).get("rejected") else []),
        *(f"damaged    {d}; the next run redoes it" for d in s["damaged"]),
        *(f"elsewhere  {o}" for o in s["outside_inputs"]),
    ])
