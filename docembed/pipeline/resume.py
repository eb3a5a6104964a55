"""Resume: where a run starts from in an output that earlier runs wrote, and the tidying before its job.

``find_resume`` refuses an output made with other settings or numerics (``guard``), finds damaged
bookkeeping (``admin.repair``) and splits the plan into units done, to do and superseded (their input
file changed). ``tidy`` then takes back what must be redone, prunes removed files' units when asked and
removes what no marker names; ``retry_units`` are the done units whose rejections a run tries again.
"""

from __future__ import annotations

import dataclasses

from docembed.errors import UsageError
from docembed.pipeline.admin import repair
from docembed.pipeline.guard import adopt_numerics, check_fingerprint
from docembed.pipeline.plan import Plan, align, outside_plan, split_done
from docembed.records import EmbedSettings, WorkUnit
from docembed.store.admin import OutputAdmin


@dataclasses.dataclass
class Resume:
    """Where a run starts from: its settings (the output's numerics adopted), the markers of units
    really done, the damaged units to redo, what is wrong with the manifest (if anything), and the
    plan's units to do, done, and superseded (their input file changed); where ``_canaries.json`` is
    damaged, the manifest's copy to restore; the plan, its files cut as the output holds them."""

    settings: EmbedSettings
    markers: dict
    damage: list
    manifest_damage: list
    todo: list
    done: list
    superseded: list
    canaries_copy: dict | None = None
    plan: Plan | None = None  # the run's plan as the output holds its files (``plan.align``)

    def repairs(self) -> list[str]:
        return self.manifest_damage + [d.describe() for d in self.damage]


def find_resume(output: OutputAdmin, plan, settings: EmbedSettings) -> Resume:
    """After refusing an output made with other settings or numerics, or with other unit boundaries:
    where the run starts from. Damaged bookkeeping is found here (``repair``), not yet mended."""
    manifest, wrong = output.load_manifest()
    check_fingerprint(output, settings, manifest)
    settings = adopt_numerics(output, settings, manifest)
    manifest_damage = [f"{wrong}: this run rewrites it"] if wrong else []
    canaries_damage = repair.canaries_damage(output, manifest)
    manifest_damage += [canaries_damage] if canaries_damage else []
    markers, damage = repair.find(output)
    plan = align(plan, markers, ((manifest or {}).get("settings") or {}).get("checkpoint_every"))
    return Resume(settings, markers, damage, manifest_damage, *split_done(plan, markers),
                  canaries_copy=manifest["canaries"] if canaries_damage else None, plan=plan)


def tidy(output: OutputAdmin, opts, plan, resume: Resume) -> tuple[list[dict], list[str]]:
    """Before the job: take back damaged units and those of changed input files, restore damaged pinned
    canaries from the manifest's copy, prune gone files' units when asked, and remove what no marker
    names. Returns (units of files outside the plan, what
    was removed). ``resume.markers`` is kept up to date."""
    markers = resume.markers
    repair.take_back(output, resume.damage)
    if resume.canaries_copy:  # restored before this run's manifest replaces the copy
        repair.restore_canaries(output, resume.canaries_copy)
    for marker in resume.superseded:  # a changed input file: its old rows go, its new units are to do
        output.remove_unit(marker)
        del markers[marker["unit_id"]]
    outside = outside_plan(markers, plan.sources)
    if opts.prune_removed:
        prune(output, markers, outside)
    return outside, output.clean_leftovers(markers)  # before the id check: unmarked parts are not "in the output"


def retry_units(markers: dict, plan, reasons: str, repeats_too: bool = False) -> list[WorkUnit]:
    """``--retry-rejects``: the done units of this plan holding rejections for these reasons, as units
    whose rejections the job tries again. ``repeats_too``: this run took units back (a changed or a
    pruned file), which may have held the first occurrence of an id rejected elsewhere as
    ``duplicate_id``; those rejections are judged again, so that such a row is embedded, not lost."""
    wanted = tuple(r.strip() for r in (reasons or "").split(",") if r.strip())
    wanted += ("duplicate_id",) if repeats_too and "duplicate_id" not in wanted else ()
    planned = {u.unit_id for u in plan.units}
    return [dataclasses.replace(WorkUnit.from_json(m), retry=wanted, retry_rejects=m.get("rejects") or "")
            for uid, m in sorted(markers.items())
            if wanted and uid in planned and set(m.get("rejected_by_reason", {})) & set(wanted)]


def retry_counts(retried: list[WorkUnit], before: dict, after: dict) -> dict:
    """Rows a retry of rejections tried, and embedded, from the units' markers before and after."""
    if not retried:
        return {}
    reasons = set(retried[0].retry)

    def standing(markers):
        return sum(n for u in retried for r, n in markers[u.unit_id].get("rejected_by_reason", {}).items()
                   if r in reasons)

    tried = standing(before)
    return {"units": len(retried), "reasons": sorted(reasons), "tried": tried, "embedded": tried - standing(after)}


def prune(output: OutputAdmin, markers: dict, outside: list[dict]) -> None:
    """``--prune-removed``: take back the units of input files that are gone, marker first, as a
    changed file's are. Refused when it would take back every unit: a mistyped --input must not
    erase an output."""
    gone = [g for g in outside if g["gone"]]
    if gone and sum(g["units"] for g in gone) == len(markers):
        raise UsageError(f"--prune-removed would delete every unit of {output.url} (none of its input files is "
                         "there any more): check --input, or use --overwrite to start afresh")
    for group in gone:
        for unit_id in group["unit_ids"]:
            output.remove_unit(markers.pop(unit_id))
        group["pruned"] = True
