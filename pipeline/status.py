"""Status: units and documents done out of the plan, read from the checkpoints of an output folder.

Works while a run is going (from done-markers and running units' progress records) and after it.
"""

from __future__ import annotations

from transforms.checkpoint import OutputFolder
from transforms.errors import OutputError


def status(output_url: str) -> dict:
    output = OutputFolder(output_url)
    manifest = output.read_manifest()
    if manifest is None:
        raise OutputError(f"{output_url} has no _manifest.json: no docembed run has started there")
    markers = output.done_markers()
    running = {uid: p for uid, p in output.progress().items() if uid not in markers}
    plan = manifest.get("plan", {})
    return {
        "output": output_url,
        "state": manifest.get("status"),
        "units_done": len(markers),
        "units_total": plan.get("units"),
        "docs_done": sum(m["row_end"] - m["row_start"] for m in markers.values()),
        "docs_in_progress": sum(p["docs"] for p in running.values()),
        "docs_total": plan.get("rows"),
        "embedded": sum(m["embedded"] for m in markers.values()),
        "rejected": sum(m["rejected"] for m in markers.values()),
        "units_running": len(running),
    }


def format_status(s: dict) -> str:
    share = 100.0 * s["docs_done"] / s["docs_total"] if s["docs_total"] else 100.0
    return "\n".join([
        f"output     {s['output']} ({s['state']})",
        f"units      {s['units_done']}/{s['units_total']} done, {s['units_running']} running",
        f"documents  {s['docs_done']}/{s['docs_total']} done ({share:.1f}%), "
        f"{s['docs_in_progress']} more in running units",
        f"           {s['embedded']} embedded, {s['rejected']} rejected",
    ])
