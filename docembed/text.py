"""Text: counts as the lines docembed prints say them ("1 unit", "2 units"; "1 id has", "2 ids have")."""

from __future__ import annotations


def agree(count: int, one: str, many: str) -> str:
    """The word that agrees with ``count``: ``one`` when it is 1, else ``many`` (``agree(n, "has", "have")``,
    ``agree(n, "its", "their")``)."""
    return one if count == 1 else many


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, in the plural unless ``count`` is 1: ``plural(1, "unit")`` is "1 unit",
    ``plural(0, "unit")`` "0 units". ``many``: the plural where it is not ``noun`` + "s"
    (``plural(n, "process", "processes")``). The noun may be several words: its last takes the "s"."""
    return f"{count} {agree(count, noun, many or noun + 's')}"
