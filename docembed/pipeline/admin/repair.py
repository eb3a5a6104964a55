"""Repair: committed units whose bookkeeping is damaged, found so that a run redoes them and says so,
and ``status`` and ``verify`` report them the same way.

A unit counts as done only while its done-marker can be read and the files it names are there as it
committed them. A marker cut short or not docembed's, a part deleted, a part replaced by another file
(its size is not the one the marker recorded: a part of another output, say), or rejections gone: each
makes the unit one to redo. All of it comes from the markers the launcher reads anyway and one
listing of the folder and of ``_rejects/``, never a read per part.
"""

from __future__ import annotations

import dataclasses

from docembed.store.admin import OutputAdmin
from docembed.store.layout import CANARIES, REJECTS, files_of, is_rejects, marker_name, part_name, rejects_name
from docembed.store.units import dumps
from docembed.errors import DamagedRecord


@dataclasses.dataclass(frozen=True)
class Damage:
    unit_id: str
    reason: str
    marker: dict | None = None  # None when the marker itself cannot be read

    def describe(self) -> str:
        return f"unit {self.unit_id}: {self.reason}"


def find(output: OutputAdmin) -> tuple[dict[str, dict], list[Damage]]:
    """(the markers of units that are really done, the damaged units)."""
    markers, unreadable = output.read_markers()
    damage = [Damage(uid, f"its marker {marker_name(uid)} cannot be read ({why})")
              for uid, why in sorted(unreadable.items())]
    parts, rejects = output.sizes(), output.sizes(REJECTS)
    for uid, marker in sorted(markers.items()):
        reason = _missing(marker, parts, rejects)
        if reason:
            damage.append(Damage(uid, reason, marker))
    broken = {d.unit_id for d in damage}
    return {uid: m for uid, m in markers.items() if uid not in broken}, damage


def _missing(marker: dict, parts: dict[str, int], rejects: dict[str, int]) -> str | None:
    for name, committed in files_of(marker).items():
        if is_rejects(name):
            if name.split("/")[-1] not in rejects:
                return f"its rejections {name} are gone"
        elif name not in parts:
            return f"its part {name} is gone"
        elif committed is not None and parts[name] != committed:
            return f"its part {name} is not the file it committed ({parts[name]} bytes, not {committed})"
    return None


def take_back(output: OutputAdmin, damage: list[Damage]) -> None:
    """Make the damaged units units to do: their markers first, then whatever of their files is left."""
    for d in damage:
        output.remove_unit(d.marker or {"unit_id": d.unit_id, "part": part_name(d.unit_id),
                                        "rejects": rejects_name(d.unit_id)})


def canaries_damage(output: OutputAdmin, manifest: dict | None) -> str | None:
    """What is wrong with ``_canaries.json``, when it is damaged and the manifest holds the copy a run
    restores; None when it is fine or absent. Damaged with no copy to restore, it is an error: letting
    the next commit pin new canaries would let any environment pass."""
    try:
        output.read_canaries()
        return None
    except DamagedRecord as exc:
        if not (manifest or {}).get("canaries"):
            raise DamagedRecord(f"{exc}, but the manifest holds no copy to restore: delete {CANARIES} to have this "
                                "run's first commit pin the canaries anew, if its workers match the ones that made "
                                "the output's vectors") from exc
        return f"{CANARIES} is damaged: this run restores it from the manifest's copy"


def restore_canaries(output: OutputAdmin, copy: dict) -> None:
    """Put the manifest's copy of the pinned canaries back, where ``canaries_damage`` found damage."""
    output.publish(CANARIES, dumps(copy))
